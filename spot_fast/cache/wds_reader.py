"""Training batches streamed from WebDataset tar shards (local paths or URLs), with the webdataset library."""
from __future__ import annotations

import io
import random
from typing import Callable, Iterator

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

import numpy as np
import torch

from spot_fast.cache import wds_store
from spot_fast.cache.batching import Rows, prefetched, rank_world, to_batch
from spot_fast.cache.fetch import fetch_shard
from spot_fast.cache.manifest import CacheError
from spot_fast.cache.sampler import sample_views


class WdsReader:
    """Training batches streamed from WebDataset tar shards: local paths or URLs.

    urls: shard paths/URLs (a list, or one brace pattern like "https://h/shard-{00000..00099}.tar";
    webdataset opens "pipe:..." and http(s) URLs). Shard order is shuffled per (seed, epoch); rank r
    of w reads every w-th shard; then a `shuffle_buffer`-sample buffer shuffles within the stream.
    With `manifest` (a local wds cache's), every rank stops after the smallest rank's image count
    and the views match TrainReader's for the same (seed, epoch); without it the view of each
    image is drawn from (seed, epoch, row) and ranks may yield different counts. The shuffle is
    shard order + a buffer: for a global per-sample shuffle read a local cache with TrainReader.
    Yields the same dicts as TrainReader. Each shard is fetched whole (an overall `timeout` per try,
    at most `tries` tries) and, with `manifest`, checked against its checksum before use; a shard
    that cannot be had stops the reader with a CacheError naming the URL and the fix.
    """

    def __init__(self, urls: str | list[str], batch_size: int, *, seed: int = 0, epoch: int = 0,
                 rank: int | None = None, world_size: int | None = None, shuffle_buffer: int = 1000,
                 manifest: dict | None = None, num_views: int | None = None, drop_last: bool = True,
                 split_tokens: bool = True, dtype: torch.dtype | None = torch.float32,
                 pin_memory: bool | None = None, prefetch: int = 2, timeout: float = 60.0, tries: int = 3):
        from webdataset.shardlists import expand_urls
        self.urls = expand_urls(urls) if isinstance(urls, str) else [str(u) for u in urls]
        self.batch_size, self.seed, self.epoch, self.buffer = batch_size, seed, epoch, shuffle_buffer
        self.rank, self.world = rank_world(rank, world_size)
        self.manifest, self.drop_last, self.prefetch = manifest, drop_last, prefetch
        self.timeout, self.tries = timeout, tries
        self.split_tokens, self.out_dtype = split_tokens, dtype
        self.pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.views = manifest["views"] if manifest else num_views
        self.dtype = manifest["dtype"] if manifest else "fp16"
        self.int_ids = bool(manifest) and manifest["image_id_type"] == "int"
        if manifest is not None and len(self.urls) != len(manifest["shards"]):
            raise CacheError(f"{len(self.urls)} shard URLs for a cache of {len(manifest['shards'])} shards: the URL "
                             f"pattern must name every shard of the cache, in index order")
        if len(self.urls) < self.world:
            raise CacheError(f"{len(self.urls)} shards are fewer than the {self.world} ranks")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, epoch: int) -> tuple[list[int], int | None]:
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.urls))
        if not self.manifest:
            return [int(i) for i in order[self.rank::self.world]], None
        counts = [sum(self.manifest["shards"][i]["images"] for i in order[r::self.world]) for r in range(self.world)]
        return [int(i) for i in order[self.rank::self.world]], min(counts)

    def _view(self, row: int, epoch: int, views: np.ndarray | None, num_views: int) -> int:
        """The view `row` shows in `epoch` (the epoch being iterated, not self.epoch)."""
        if views is not None:
            return int(views[row])
        return int(np.random.default_rng([self.seed, epoch, 3, row]).integers(num_views))

    def _raw(self, shards: list[int]) -> Iterator[dict]:
        """Raw samples ({"__key__", "features.npy": bytes, ...}) of `shards` in order, each shard fetched
        whole and checked against the manifest before any of its samples is used (fetch.py)."""
        for i in shards:
            url = self.urls[i]
            expected = None
            if self.manifest is not None:
                s = self.manifest["shards"][i]
                expected = s.get("xxh3", {}).get(wds_store.shard_name(s["index"]))
            data = fetch_shard(url, expected, timeout=self.timeout, tries=self.tries)
            files = ({**f, "__url__": url} for f in tar_file_iterator(io.BytesIO(data)))
            yield from group_by_keys(files)

    def _samples(self, epoch: int) -> Iterator[dict]:
        shards, limit = self.plan(epoch)
        views = None
        if self.manifest:
            views = _views_by_row(self.manifest, self.seed, epoch)
        rng = random.Random(f"{self.seed}-{epoch}-{self.rank}")
        pipe = wds.shuffle(self.buffer, initial=self.buffer, rng=rng)(self._raw(shards))
        for n, raw in enumerate(pipe):
            if limit is not None and n >= limit:
                return
            sample = wds_store.decode_sample({k: v for k, v in raw.items() if not k.startswith("__")})
            row = int(raw["__key__"])
            feats = sample["features"]                      # (V, N, D)
            v = self._view(row, epoch, views, self.views or feats.shape[0])
            out = {"index": row, "view": v, "image_id": sample["image_id"]}
            for name in ("features", "split_tokens", "features_scale", "split_tokens_scale"):
                if name in sample and (self.split_tokens or not name.startswith("split")):
                    out[name] = sample[name][v]
            yield out

    def _batches(self, epoch: int) -> Iterator[dict]:
        batch = []
        image_id = (lambda x: int(x)) if self.int_ids else (lambda x: x)
        for sample in self._samples(epoch):
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._collate(batch, image_id)
                batch = []
        if batch and not self.drop_last:
            yield self._collate(batch, image_id)

    def _collate(self, samples: list[dict], image_id: Callable) -> dict:
        cols = {k: [s[k] for s in samples] for k in samples[0]}
        for k in ("features", "split_tokens", "features_scale", "split_tokens_scale"):
            if k in cols:
                cols[k] = np.stack(cols[k])
        return to_batch(Rows(cols), self.dtype, image_id, self.pin, self.out_dtype)

    def __iter__(self) -> Iterator[dict]:
        epoch = self.epoch
        return prefetched(lambda: self._batches(epoch), self.prefetch)


def _views_by_row(manifest: dict, seed: int, epoch: int) -> np.ndarray:
    """Each source row's view in `epoch`: the sampler's per-sample views (so TrainReader agrees)."""
    num_rows = manifest["counts"]["source_images"]
    stored = np.setdiff1d(np.arange(num_rows), [s["index"] for s in manifest["skipped"]])
    views = np.zeros(num_rows, np.int64)
    views[stored] = sample_views(len(stored), manifest["views"], seed=seed, epoch=epoch)
    return views
