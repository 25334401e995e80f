"""Trivial segmentations a trained model has to beat, scored with the same metrics as the models.

    one_slot_labels(4, 64, 64)       # (4, 64, 64) zeros: the whole image is one segment
    grid_labels(7, 64, 64)           # (64, 64): a fixed grid of 7 equal-area blocks
    score_baselines(val_cache, num_slots=7)  # {"one slot": metrics, "grid of 7": metrics}

Neither looks at the image, so any score they reach comes from the dataset's layout alone (object
sizes and positions): a model's FG-ARI or mBO is only evidence of learning above these figures.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from spot_fast.metrics import MetricAccumulator


def one_slot_labels(batch: int, height: int, width: int) -> torch.Tensor:
    """(B, H, W) int64 zeros: every pixel in the same segment."""
    return torch.zeros(batch, height, width, dtype=torch.long)


def grid_rows(num_blocks: int) -> list[int]:
    """Blocks per row of the grid: floor(sqrt(K)) rows, the first K % rows rows one block wider.
    K=3 -> [3] (three vertical stripes), 4 -> [2, 2], 5 -> [3, 2], 7 -> [4, 3], 9 -> [3, 3, 3]."""
    if num_blocks < 1:
        raise ValueError(f"the grid needs at least one block, got {num_blocks}")
    rows = math.isqrt(num_blocks)
    return [num_blocks // rows + (i < num_blocks % rows) for i in range(rows)]


def grid_labels(num_blocks: int, height: int, width: int) -> torch.Tensor:
    """(H, W) int64 label map of `num_blocks` blocks of (nearly) equal area, numbered in raster
    order: each row's height is proportional to its number of blocks, which split it evenly."""
    per_row = grid_rows(num_blocks)
    labels = torch.empty(height, width, dtype=torch.long)
    top, first, done = 0, 0, 0
    for n in per_row:
        done += n
        bottom = round(height * done / num_blocks)
        cols = torch.arange(width) * n // width                  # (W,) block of each column
        labels[top:bottom] = first + cols
        top, first = bottom, first + n
    return labels


def score(labels_of: Callable[[dict], torch.Tensor], batches) -> dict[str, float]:
    """MetricAccumulator.compute() of the label maps `labels_of(batch)` over eval batches holding
    instance_mask, class_mask and ignore_mask (B, M, M)."""
    acc = MetricAccumulator()
    for batch in batches:
        acc.update(labels_of(batch), batch["instance_mask"], batch["class_mask"], batch["ignore_mask"])
    return acc.compute()


def score_baselines(cache, num_slots: int, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Metrics of both trivial baselines on a val cache (with masks): {name: metrics}."""
    def one_slot(batch):
        return one_slot_labels(*batch["instance_mask"].shape)

    def grid(batch):
        B, H, W = batch["instance_mask"].shape
        return grid_labels(num_slots, H, W).expand(B, H, W)

    return {name: score(fn, cache.eval_reader(batch_size, split_tokens=False))
            for name, fn in (("one slot", one_slot), (f"grid of {num_slots}", grid))}
