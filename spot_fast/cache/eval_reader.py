"""Evaluation batches: every stored image once, in source order, with its ground truth."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from spot_fast.cache.batching import Rows, prefetched, to_batch
from spot_fast.cache.codec import scale_name
from spot_fast.cache.store import CacheStore
from spot_fast.cache.layout import MASK_NAMES


class EvalReader:
    """Every stored image once, in source order, with ground truth (val caches).

    Yields dict(features (B, N, D) float32, split_tokens if present and wanted, image_id list,
    index (B,), view (B,) zeros, and for val caches instance_mask/class_mask (B, M, M) int64,
    ignore_mask (B, M, M) uint8, jpeg list[bytes]). Train caches give view 0 of each image.
    `dtype=None` keeps the stored dtype; for an 8-bit cache the batch then also holds
    `features_scale` (B, N, 1) float32 (and `split_tokens_scale`): `device_batches` dequantises.
    """

    def __init__(self, cache: CacheStore, batch_size: int, *, split_tokens: bool | None = None,
                 dtype: torch.dtype | None = torch.float32, pin_memory: bool = False, prefetch: int = 2):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cache, self.batch_size, self.prefetch, self.pin = cache, batch_size, prefetch, pin_memory
        self.dtype = dtype
        self.split_tokens = cache.has_split_tokens if split_tokens is None else split_tokens

    def __len__(self) -> int:
        return -(-self.cache.num_images // self.batch_size)

    def _read(self, k: int) -> Rows:
        tokens = ("features", *(("split_tokens",) if self.split_tokens else ()))
        names = (*tokens, *map(scale_name, tokens), *MASK_NAMES, "jpeg")
        shard = self.cache.read_shard(k, names)
        zero = np.zeros(len(shard), np.int64)
        cols = {"index": shard.rows, "view": zero, "image_id": shard.image_ids}
        for name in (*tokens, *map(scale_name, tokens)):
            if getattr(shard, name) is not None:
                cols[name] = _pick_view(getattr(shard, name), zero)
        if self.cache.has_masks:
            cols.update({n: getattr(shard, n) for n in MASK_NAMES})
            cols["jpeg"] = shard.jpeg
        return Rows(cols)

    def _batches(self) -> Iterator[dict]:
        B, left = self.batch_size, None
        for s in self.cache.shards:
            if s["images"] == 0:
                continue
            rows = self._read(s["index"])
            rows = rows if left is None else Rows.cat([left, rows])
            start = 0
            while start + B <= len(rows):
                yield to_batch(rows.slice(start, start + B), self.cache.dtype, self.cache.image_id, self.pin, self.dtype)
                start += B
            left = rows.slice(start, len(rows))
        if left is not None and len(left):
            yield to_batch(left, self.cache.dtype, self.cache.image_id, self.pin, self.dtype)

    def __iter__(self) -> Iterator[dict]:
        return prefetched(self._batches, self.prefetch)


def _pick_view(tokens: np.ndarray | None, views: np.ndarray) -> np.ndarray | None:
    """(n, V, T, D) -> (n, T, D): row i's view views[i]."""
    return None if tokens is None else tokens[np.arange(len(views)), views]
