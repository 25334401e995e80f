"""Training batches at memory speed: a global shuffle, one copy of exactly the selected slabs per batch.

    for batch in cache.train_reader(64, seed=0, epoch=e, dtype=None):   # stored dtype, for device_batches
        ...

Which samples: `sampler.epoch_batches` (a global per-sample shuffle, deterministic in (seed,
epoch); rank r of w takes its slice of every global batch). How: the shard files are
memory-mapped (slabs.py) and worker threads copy the B selected (image, view) slabs of a batch
straight into a preallocated buffer (pinned when CUDA is available), `prefetch` batches ahead.

Buffer contract: the buffers form a ring of `prefetch + 2` batches, so a yielded batch stays
intact while the consumer holds it and the one after it; it is overwritten when the consumer
asks for the batch after that, or by the next epoch's reader (rings are reused). `.clone()` a
batch's tensors to keep them longer.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from spot_fast.cache.batching import rank_world
from spot_fast.cache.store import CacheStore
from spot_fast.cache.manifest import CacheError
from spot_fast.cache.sampler import dropped_samples, epoch_batches, num_batches
from spot_fast.cache.codec import FLOAT_OUT, STORED_TORCH, dequantize, is_quantized, scale_name
from spot_fast.cache.slabs import wds_slabs, zarr_slabs


class TrainReader:
    """Training batches: every stored image once per epoch (drop_last=False), one random view, shuffled.

    Yields dict(features (b, N, D), split_tokens (b, T, D) if present and wanted, image_id list,
    view (b,) int64, index (b,) int64 source row), b = batch_size except a short last batch when
    drop_last=False. Tokens are float32 unless `dtype=None`, which keeps the stored dtype (half the
    host traffic for fp16: cast on the GPU, see `device_batches`); an 8-bit cache's batches then
    hold the stored bytes (int8 / float8_e4m3fn) and `features_scale` (b, N, 1) float32 (and
    `split_tokens_scale`), dequantised by `device_batches` on the device.
    `len(reader)` is the epoch's true batch count; `start_step` resumes mid-epoch without reading
    the skipped batches. Each shard file is hashed the first time this process reads it (`check`).
    """

    def __init__(self, cache: CacheStore, batch_size: int, *, seed: int = 0, epoch: int = 0,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = True,
                 split_tokens: bool | None = None, dtype: torch.dtype | None = torch.float32,
                 pin_memory: bool | None = None, prefetch: int = 2, workers: int = 2,
                 start_step: int = 0, check: bool = True):
        _positive(batch_size=batch_size, prefetch=prefetch, workers=workers)
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        if dtype is not None and dtype not in FLOAT_OUT:
            raise ValueError(f"dtype must be None (keep the stored dtype) or a float dtype, got {dtype}")
        if split_tokens and not cache.has_split_tokens:
            raise CacheError(f"cache {cache.path} holds no split-layer tokens (built without --split-block)")
        self.cache, self.batch_size, self.seed, self.epoch = cache, batch_size, seed, epoch
        self.rank, self.world = rank_world(rank, world_size)
        self.drop_last, self.prefetch, self.workers, self.start_step = drop_last, prefetch, workers, start_step
        self.check = check
        self.split_tokens = cache.has_split_tokens if split_tokens is None else split_tokens
        tokens = ("features", "split_tokens") if self.split_tokens else ("features",)
        self.quantized = is_quantized(cache.dtype)
        self.tokens = tokens
        self.names = (*tokens, *map(scale_name, tokens)) if self.quantized else tokens
        self.dtype = dtype                  # what the batch holds: None = the stored dtype (+ scales)
        # what the ring holds: 8-bit caches always keep the stored bytes (dequantised after the copy)
        self.out_dtype = STORED_TORCH[cache.dtype] if dtype is None or self.quantized else dtype
        self.pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.num_samples = len(cache.samples)
        self._check_size()
        self.slabs = {n: wds_slabs(cache, n) if cache.format == "wds" else zarr_slabs(cache, n, check)
                      for n in self.names}
        self._checked: set[int] = set()

    def _check_size(self) -> None:
        n, B, w = self.num_samples, self.batch_size, self.world
        if len(self) > 0 or n == 0:
            return
        if n < w:
            raise CacheError(f"cache {self.cache.path} holds {n} images, fewer than the {w} ranks: use fewer ranks")
        raise CacheError(f"batch size {B} x {w} rank(s) is more than the {n} images of cache {self.cache.path}: "
                         f"with drop_last=True no batch would be read; use drop_last=False or a batch size "
                         f"<= {n // w}")

    @property
    def dropped(self) -> int:
        """Images no rank reads in one epoch (at most world_size - 1 with drop_last=False)."""
        return dropped_samples(self.num_samples, self.batch_size, world_size=self.world, drop_last=self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return num_batches(self.num_samples, self.batch_size, world_size=self.world, drop_last=self.drop_last)

    def plan(self, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """This rank's (samples, views) of every batch of `epoch`, from batch 0."""
        return epoch_batches(self.num_samples, self.batch_size, seed=self.seed, epoch=epoch, rank=self.rank,
                             world_size=self.world, drop_last=self.drop_last, num_views=self.cache.views)

    def _take_ring(self) -> list[dict[str, torch.Tensor]]:
        """prefetch + 2 batch buffers: a free ring of the cache's pool (kept across epochs and
        readers: allocating and faulting in ~100 MB each epoch would cost more than a batch), or new."""
        key = (self.batch_size, self.names, self.out_dtype, self.pin, self.prefetch)
        free = self.cache.ring_pool.setdefault(key, [])
        if free:
            return free.pop()

        def buffer(name):
            dtype = torch.float32 if name not in self.tokens else self.out_dtype
            t = torch.empty((self.batch_size, *self.slabs[name].shape), dtype=dtype, pin_memory=self.pin)
            return t.zero_()              # fault the pages in now, not during the first batches
        return [{n: buffer(n) for n in self.names} for _ in range(self.prefetch + 2)]

    def _fill(self, buf: dict[str, torch.Tensor], samples: np.ndarray, views: np.ndarray,
              advised: bool = False, ahead: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
        """Batch (samples, views) copied into `buf`: the one host copy of the batch. `advised`: its
        slabs were advised when an earlier batch was filled; `ahead`: the batch ADVISE_AHEAD later,
        advised now (before this copy), so a cold disk reads it while this one and the next are copied."""
        if self.check:
            for k in set(self.cache.samples.shard[samples].tolist()) - self._checked:
                self.cache.check_shard(k, self.names)
                self._checked.add(k)
        if ahead is not None:
            for name in self.tokens:
                self.slabs[name].advise(*ahead)
        b = len(samples)
        batch = {}
        for name in self.names:
            self.slabs[name].fill(buf[name], samples, views, advise=not advised)
            batch[name] = buf[name][:b]
        if self.quantized and self.dtype is not None:       # host floats were asked for: dequantise here
            for name in self.tokens:
                batch[name] = dequantize(batch[name], batch.pop(scale_name(name)), self.dtype)
        ids = self.cache.samples.image_ids
        batch.update(index=torch.from_numpy(self.cache.samples.rows[samples]), view=torch.from_numpy(views),
                     image_id=[ids[s] for s in samples.tolist()])
        return batch

    def __iter__(self) -> Iterator[dict]:
        return self._batches(self.epoch)

    def _batches(self, epoch: int) -> Iterator[dict]:
        plan = self.plan(epoch)[self.start_step:]
        ring = self._take_ring()
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="cache-read")
        pending: deque[Future] = deque()
        def submit(j: int) -> None:
            later = j + ADVISE_AHEAD
            pending.append(pool.submit(self._fill, ring[j % len(ring)], *plan[j], j >= ADVISE_AHEAD,
                                       plan[later] if later < len(plan) else None))
        try:
            for j in range(min(self.prefetch, len(plan))):
                submit(j)
            for i in range(len(plan)):
                batch = pending.popleft().result()
                ahead = i + self.prefetch           # its buffer held batch i - 2: the consumer is done with it
                if ahead < len(plan):
                    submit(ahead)
                yield batch
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.cache.ring_pool[(self.batch_size, self.names, self.out_dtype, self.pin, self.prefetch)].append(ring)


ADVISE_AHEAD = 4      # batches: batch j's worker advises batch j + 4 (a cold disk then always has reads queued)


def _positive(**values: int) -> None:
    for name, v in values.items():
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
