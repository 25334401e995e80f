"""Training batches for the loop: from a feature cache or from images through the frozen encoder.

Both follow `spot_fast.cache.sampler.epoch_batches` (a global per-sample shuffle in (seed, epoch),
rank r taking its contiguous slice of every global batch), so a 2-rank run sees exactly the
samples of a 1-rank run with twice the batch, and `--images` sees exactly what a cache of the
same images holds. `epoch(e, start_step)` starts inside an epoch without reading what it skips.

    source = CacheBatches(cache, 64, seed=0, split_tokens=False)
    for batch in device_batches(source.epoch(3, start_step=120), "cuda", torch.bfloat16): ...
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Iterable, Iterator

import numpy as np
import torch

from spot_fast.cache.manifest import from_stored
from spot_fast.cache.sampler import epoch_batches, num_batches

TOKEN_NAMES = ("features", "split_tokens")


def device_batches(batches: Iterable[dict], device, dtype: torch.dtype = torch.float32) -> Iterator[dict]:
    """Stand-in for `spot_fast.cache.device_batches` (reader branch): tensors to `device`
    (non_blocking), token tensors cast to `dtype` there; other entries pass through."""
    device = torch.device(device)
    for batch in batches:
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=True)
                v = v.to(dtype) if k in TOKEN_NAMES else v
            out[k] = v
        yield out


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


class CacheBatches(_Batches):
    """Batches of a cache's stored images (sample i = the i-th stored image), shards read on demand
    and the last `held_shards` kept. Tokens come in the stored dtype unless `dtype` is given."""

    def __init__(self, cache, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, split_tokens: bool = False, dtype: torch.dtype | None = None,
                 held_shards: int = 8):
        super().__init__(cache.num_images, cache.views, batch_size, seed=seed, rank=rank, world_size=world_size,
                         drop_last=drop_last)
        self.cache, self.dtype, self.held_shards = cache, dtype, held_shards
        self.names = TOKEN_NAMES if split_tokens else TOKEN_NAMES[:1]
        counts = [s["images"] for s in cache.shards]
        self.starts = np.concatenate([[0], np.cumsum(counts)])          # first sample of each shard
        self.held: OrderedDict[int, object] = OrderedDict()

    def _shard(self, k: int):
        if k not in self.held:
            self.held[k] = self.cache.read_shard(k, self.names)
            while len(self.held) > self.held_shards:
                self.held.popitem(last=False)
        self.held.move_to_end(k)
        return self.held[k]

    def gather(self, rows: np.ndarray, views: np.ndarray) -> dict:
        shard_of = np.searchsorted(self.starts, rows, side="right") - 1
        out = {}
        for name in self.names:
            parts = {}
            for k in np.unique(shard_of):
                m = shard_of == k
                parts[k] = (m, getattr(self._shard(int(k)), name)[rows[m] - self.starts[k], views[m]])
            first = next(iter(parts.values()))[1]
            array = np.empty((len(rows), *first.shape[1:]), first.dtype)   # (b, T, D)
            for m, values in parts.values():
                array[m] = values
            out[name] = from_stored(array, self.cache.dtype, self.dtype)
        out["index"] = torch.from_numpy(rows)
        out["view"] = torch.from_numpy(views)
        return out


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


def cache_batches(cache, batch_size: int, *, seed: int, rank: int, world_size: int, drop_last: bool,
                  split_tokens: bool):
    """The cache's training batches in the stored dtype: the reader's `TrainReader` when it has the
    sampler API (`start_step`), else `CacheBatches`. Both follow the same sampler."""
    from spot_fast.cache.reader import TrainReader
    if "start_step" not in inspect.signature(TrainReader.__init__).parameters:
        return CacheBatches(cache, batch_size, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last,
                            split_tokens=split_tokens)
    return _ReaderBatches(cache, batch_size, dict(seed=seed, rank=rank, world_size=world_size, drop_last=drop_last,
                                                  split_tokens=split_tokens, dtype=None))


class _ReaderBatches:
    """`CacheBatches`' interface over the reader's `cache.train_reader(..., start_step=)`."""

    def __init__(self, cache, batch_size: int, kw: dict):
        self.cache, self.batch_size, self.kw = cache, batch_size, kw

    def __len__(self) -> int:
        return len(self.cache.train_reader(self.batch_size, epoch=0, **self.kw))

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        return iter(self.cache.train_reader(self.batch_size, epoch=epoch, start_step=start_step, **self.kw))
