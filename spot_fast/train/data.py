"""Training batches for the loop: from a feature cache or from images through the frozen encoder.

Both follow `spot_fast.cache.sampler.epoch_batches` (a global per-sample shuffle in (seed, epoch),
rank r taking its contiguous slice of every global batch), so a 2-rank run sees exactly the
samples of a 1-rank run with twice the batch, and `--images` sees exactly what a cache of the
same images holds. `epoch(e, start_step)` starts inside an epoch without reading what it skips.

    source = CacheBatches(cache, 64, seed=0, rank=0, world_size=1, drop_last=True, split_tokens=False)
    for batch in device_batches(source.epoch(3, start_step=120), "cuda", torch.bfloat16): ...
"""
from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np
import torch

from spot_fast.cache.codec import is_quantized
from spot_fast.cache.sampler import epoch_batches, num_batches
from spot_fast.cache.tail import FrozenTail
from spot_fast.cache.wds_reader import WdsReader
from spot_fast.train.config import encoder_from_manifest


class _Batches:
    """The sampler's plan for one rank; subclasses turn (rows, views) into a batch dict."""

    def __init__(self, num_samples: int, num_views: int, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True):
        self.num_samples, self.num_views, self.batch_size = num_samples, num_views, batch_size
        self.seed, self.rank, self.world_size, self.drop_last = seed, rank, world_size, drop_last

    def _plan_kw(self) -> dict:
        return dict(rank=self.rank, world_size=self.world_size, drop_last=self.drop_last, num_views=self.num_views)

    def __len__(self) -> int:
        """Batches per epoch (the same for every epoch and every rank)."""
        return num_batches(self.num_samples, self.batch_size, **self._plan_kw())

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        plan = epoch_batches(self.num_samples, self.batch_size, seed=self.seed, epoch=epoch, **self._plan_kw())
        for rows, views in plan[start_step:]:
            yield self.gather(rows, views)

    def gather(self, rows: np.ndarray, views: np.ndarray) -> dict:
        raise NotImplementedError


class ImageBatches(_Batches):
    """Batches computed on the fly: the source's training views (the reference's transforms)
    through the frozen encoder on `device` -> final tokens (and split tokens when `split_block`)."""

    def __init__(self, source, encoder, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, split_block: int | None = None, device="cpu"):
        super().__init__(len(source), source.num_views, batch_size, seed=seed, rank=rank, world_size=world_size,
                         drop_last=drop_last)
        self.source, self.encoder = source, encoder.to(device)
        self.split_block, self.device = split_block, torch.device(device)

    def gather(self, rows: np.ndarray, views: np.ndarray) -> dict:
        images = torch.stack([self.source.train_views(int(i))[int(v)] for i, v in zip(rows, views)])  # (b, 3, S, S)
        tokens = self.encoder(images.to(self.device), split_block=self.split_block)
        out = {"features": tokens.final, "index": torch.from_numpy(rows), "view": torch.from_numpy(views)}
        if self.split_block is not None:
            out["split_tokens"] = tokens.split
        return out


class CacheBatches:
    """A cache's training batches, tokens in the stored dtype (cast -- or dequantised -- on the device
    by `spot_fast.cache.device_batches`), through the reader's `cache.train_reader(...)`.

    Stage 2 on an 8-bit cache: every batch carries the cache's frozen tail as "targets", and
    `device_batches` makes the stage-2 target (`features`) from the split tokens with it on the
    device, so the target is exactly the frozen tail of what the student reads (the stored 8-bit
    final tokens differ from that by their rounding; fp16/bf16/fp32 caches keep their stored ones)."""

    def __init__(self, cache, batch_size: int, *, seed: int, rank: int, world_size: int, drop_last: bool,
                 split_tokens: bool):
        self.cache, self.batch_size = cache, batch_size
        self.kw = dict(seed=seed, rank=rank, world_size=world_size, drop_last=drop_last,
                       split_tokens=split_tokens, dtype=None)
        first = cache.train_reader(batch_size, epoch=0, **self.kw)
        self.steps, self.dropped = len(first), first.dropped    # the same for every epoch
        self.targets = stage2_targets(cache, split_tokens)

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        batches = iter(self.cache.train_reader(self.batch_size, epoch=epoch, start_step=start_step, **self.kw))
        return with_targets(batches, self.targets)


def stage2_targets(cache, split_tokens: bool) -> FrozenTail | None:
    """The frozen tail that makes an 8-bit cache's stage-2 targets from its split tokens (None for
    other caches, or without split tokens)."""
    if not split_tokens or not is_quantized(cache.dtype):
        return None
    return FrozenTail.from_cache(cache, encoder_from_manifest(cache.manifest, cache.split_block))


def with_targets(batches: Iterator[dict], targets: FrozenTail | None) -> Iterator[dict]:
    """`batches`, each carrying `targets` (read by `device_batches`) when there is one."""
    if targets is None:
        return batches
    return ({**b, "targets": targets} for b in batches)


class StreamBatches:
    """Training batches streamed from WebDataset shard URLs (a `--format wds` cache served over
    HTTP or on shared storage, its shards in index order) through the reader's `WdsReader`.
    Shards are shuffled per epoch and dealt to the ranks, then a buffer shuffles the samples.
    Every epoch is cut to the same number of batches: what the rank with the fewest images gets
    in the worst deal of shards, so all ranks and epochs take the same steps. `targets`: an 8-bit
    cache's frozen tail (`stage2_targets`), carried by every batch as CacheBatches' are."""

    def __init__(self, urls: list[str], manifest: dict, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, split_tokens: bool = False, targets: FrozenTail | None = None):
        self.urls, self.batch_size, self.targets = urls, batch_size, targets
        self.kw = dict(seed=seed, rank=rank, world_size=world_size, manifest=manifest, split_tokens=split_tokens,
                       dtype=None, drop_last=True)
        sizes = sorted(s["images"] for s in manifest["shards"])
        self.steps = sum(sizes[: len(sizes) // world_size]) // batch_size

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        reader = WdsReader(self.urls, self.batch_size, epoch=epoch, **self.kw)
        batches = itertools.islice(iter(reader), start_step, self.steps)     # resuming reads the skipped batches
        return with_targets(batches, self.targets)
