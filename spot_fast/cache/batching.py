"""Pieces the readers share: rank/world lookup, a background prefetch thread, stored rows -> batch dict."""
from __future__ import annotations

import os
import queue
import threading
from typing import Callable, Iterator

import numpy as np
import torch

from spot_fast.cache.layout import MASK_NAMES
from spot_fast.cache.codec import from_stored, scale_name


def rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else torch.distributed's, else RANK / WORLD_SIZE, else (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


_END = object()


def prefetched(make_iter: Callable[[], Iterator], depth: int) -> Iterator:
    """Run `make_iter()` in a background thread, `depth` items ahead of the consumer."""
    if depth <= 0:
        yield from make_iter()
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        items = make_iter()
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:   # handed to the consumer
            put(e)
        finally:
            items.close()

    thread = threading.Thread(target=work, name="cache-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


class Rows:
    """Columns of selected rows (stored dtypes), concatenated and sliced as one unit."""

    def __init__(self, cols: dict[str, np.ndarray | list]):
        self.cols = cols

    def __len__(self) -> int:
        return len(self.cols["index"])

    @staticmethod
    def cat(parts: list["Rows"]) -> "Rows":
        nonempty = [p for p in parts if len(p)]
        if len(nonempty) <= 1:
            return nonempty[0] if nonempty else parts[0]
        parts = nonempty
        out = {}
        for k, v in parts[0].cols.items():
            out[k] = sum((p.cols[k] for p in parts), []) if isinstance(v, list) else \
                np.concatenate([p.cols[k] for p in parts])
        return Rows(out)

    def slice(self, a: int, b: int) -> "Rows":
        return Rows({k: v[a:b] for k, v in self.cols.items()})


def to_batch(rows: Rows, dtype: str, image_id: Callable, pin: bool, out: torch.dtype | None = torch.float32) -> dict:
    """Stored rows -> the batch dict: tokens as `out` (float32; None keeps the stored dtype, and an
    8-bit cache's `<name>_scale` float32 beside them), int64 index/view, masks as tensors. Token
    tensors are allocated pinned when `pin`."""
    batch, cols = {}, rows.cols
    for name, v in cols.items():
        if name in ("features", "split_tokens"):
            scale = cols.get(scale_name(name))
            batch[name] = from_stored(v, dtype, out, pin_memory=pin, scale=scale)
            if scale is not None and out is None:
                batch[scale_name(name)] = torch.from_numpy(np.ascontiguousarray(scale, np.float32))
        elif name.endswith("_scale"):
            continue
        elif name in ("index", "view"):
            batch[name] = torch.from_numpy(np.asarray(v, np.int64))
        elif name in MASK_NAMES:
            t = torch.from_numpy(np.ascontiguousarray(v))
            batch[name] = t if name == "ignore_mask" else t.long()
        elif name == "image_id":
            batch[name] = [image_id(x) for x in v]
        else:
            batch[name] = v
    return batch
