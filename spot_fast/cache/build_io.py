"""Pieces of the build that are not the build itself: source rows for a DataLoader, mask arrays,
the tail weights file, and the progress bar."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from spot_fast.cache.manifest import MASK_DTYPES, CacheError
from spot_fast.data.base import BadImage, Source

class SourceItems(Dataset):
    """Source rows as plain dicts for a DataLoader; BadImage becomes a 'bad' entry, never an error."""

    def __init__(self, source: Source, split: str):
        self.source, self.split = source, split

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        src = self.source
        try:
            if self.split == "train":
                item = {"views": src.train_views(i)}
            else:
                s = src.val_sample(i)
                item = {"views": s.image[None], "jpeg": s.jpeg, "instance_mask": s.instance_mask,
                        "class_mask": s.class_mask, "ignore_mask": s.ignore_mask}
        except BadImage as e:
            return {"index": i, "bad": {"index": i, "path": e.path, "reason": e.reason}}
        return {"index": i, "id": src.image_id(i), **item}


def list_collate(items: list[dict]) -> list[dict]:
    return items


def mask_array(mask: torch.Tensor, dtype: str, what: str, image_id) -> np.ndarray:
    info = np.iinfo(MASK_DTYPES[dtype])
    lo, hi = int(mask.min()), int(mask.max())
    if lo < info.min or hi > info.max:
        raise CacheError(f"image {image_id}: {what} values {lo}..{hi} do not fit --mask-dtype {dtype}; "
                         f"rerun with --mask-dtype int16")
    return mask.numpy().astype(MASK_DTYPES[dtype])


def save_tail(path: Path, state: dict[str, torch.Tensor], info: dict) -> None:
    """The tail weights as safetensors. Metadata is ONE key: safetensors writes its metadata map in
    hash order, which differs between processes when there are several keys (not byte-stable)."""
    from safetensors.torch import save_file
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp),
              metadata={"spot_fast": json.dumps(info, sort_keys=True)})
    os.replace(tmp, path)


class BuildProgress:
    """A rich progress bar with images/s, ETA and the skipped count (rank 0 only)."""

    def __init__(self, total: int, enabled: bool, label: str):
        self.enabled, self.total, self.label = enabled, total, label
        self.skipped, self.done, self.t0 = 0, 0, time.perf_counter()

    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]:.1f} img/s"), TextColumn("ETA"),
                                TimeRemainingColumn(), TimeElapsedColumn(),
                                TextColumn("skipped {task.fields[skipped]}"))
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=self.total, rate=0.0, skipped=0)
        return self

    def advance(self, n: int, skipped: int) -> None:
        self.done += n
        self.skipped += skipped
        if self.enabled:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, advance=n, rate=rate, skipped=self.skipped)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
