"""Reading a cache back: check it fits the model, then stream batches for training or evaluation.

    cache = open_cache(path, expect=cfg)                     # CacheError if it does not fit
    for batch in cache.train_reader(64, seed=0, epoch=e):    # dict of tensors, see TrainReader
        ...
    for batch in cache.eval_reader(64):                      # in order, with masks and JPEG bytes
        ...
    WdsReader(["pipe:curl -s https://host/shard-{00000..00099}.tar"], 64)   # streaming

Random-init caches (built with --random-init) are refused unless `allow_random_init=True`:
features of an untrained ViT train nothing useful, and a cache built for a test must never be
mistaken for a real one.
"""
from __future__ import annotations

import os
import queue
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from spot_fast.cache import wds_store
from spot_fast.cache.layout import MASK_NAMES, Shard
from spot_fast.cache.manifest import TAIL_FILE, CacheError, from_stored, read_manifest
from spot_fast.cache.zarr_store import ZarrStore
from spot_fast.config import EncoderConfig, SPOTConfig


# ----------------------------------------------------------------------------- the cache

class Cache:
    """A finished cache: its manifest and shard-level access to its arrays."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        m = self.manifest
        self.format: str = m["format"]
        self.dtype: str = m["dtype"]
        self.views: int = m["views"]
        self.num_images: int = m["counts"]["images"]      # stored (skipped images excluded)
        self.num_rows: int = m["counts"]["source_images"]
        self.shards: list[dict] = m["shards"]
        self.split_block: int | None = m["layers"]["split_block"]
        self._int_ids = m["image_id_type"] == "int"
        self._zarr: ZarrStore | None = None

    @property
    def has_split_tokens(self) -> bool:
        return self.split_block is not None

    @property
    def has_masks(self) -> bool:
        return "instance_mask" in self.manifest["arrays"]

    def read_shard(self, k: int, names: tuple[str, ...] | None = None) -> Shard:
        """The valid rows of shard k (stored dtypes); `names` limits the arrays read (zarr only)."""
        s = self.shards[k]
        if self.format == "wds":
            return wds_store.read_shard(self.path, k, s["start"], s["stop"], self.manifest["arrays"])
        if self._zarr is None:
            self._zarr = ZarrStore(self.path, self.manifest["arrays"], mode="r",
                                   chunk_images=self.manifest["chunk_images"],
                                   raw=self.manifest["compression"] is None)
        return self._zarr.read(k, s["start"], s["stop"], names)

    def image_id(self, raw: str):
        return int(raw) if self._int_ids else raw

    def tail_state(self) -> dict[str, torch.Tensor]:
        """The frozen weights of blocks >= split_block and the final norm (timm names)."""
        if not self.has_split_tokens:
            raise CacheError(f"cache {self.path} was built without --split-block: it holds no tail weights")
        from safetensors.torch import load_file
        return load_file(str(self.path / TAIL_FILE))

    def shard_urls(self) -> list[str]:
        if self.format != "wds":
            raise CacheError(f"cache {self.path} is in zarr format; WdsReader needs a --format wds cache")
        return [str(self.path / wds_store.shard_name(s["index"])) for s in self.shards]

    def train_reader(self, batch_size: int, **kw) -> "TrainReader":
        return TrainReader(self, batch_size, **kw)

    def eval_reader(self, batch_size: int, **kw) -> "EvalReader":
        return EvalReader(self, batch_size, **kw)

    def wds_reader(self, batch_size: int, **kw) -> "WdsReader":
        return WdsReader(self.shard_urls(), batch_size, manifest=self.manifest, **kw)


def _describe(d: dict) -> str:
    g = d["image_size"] // d["patch_size"]
    return (f"encoder {d['name']!r} (D={d['embed_dim']}, {d['image_size']}px, patch {d['patch_size']}, "
            f"grid {g}x{g}, depth {d['depth']})")


def open_cache(path: str | os.PathLike, expect: EncoderConfig | SPOTConfig | None = None,
               need_split_tokens: bool = False, allow_random_init: bool = False) -> Cache:
    """Open the cache at `path` and check that it fits the model `expect`.

    Raises CacheError naming both sides when the encoder name, feature width, image size, patch
    size (grid) or -- for stage 2 -- split block or depth differ, when split-layer tokens are
    needed but missing (`need_split_tokens`, implied by a stage-2 SPOTConfig), or when the cache
    was built from a random-init encoder and `allow_random_init` is False.
    """
    cache = Cache(path)
    m = cache.manifest
    if m["random_init"] and not allow_random_init:
        raise CacheError(f"cache {path} was built with a random-init encoder ({m['weights']}), for tests "
                         f"only; build it from real weights, or pass allow_random_init=True")
    if isinstance(expect, SPOTConfig):
        need_split_tokens = need_split_tokens or expect.stage == 2
        expect = expect.encoder
    if expect is None:
        if need_split_tokens and not cache.has_split_tokens:
            raise CacheError(f"cache {path} holds no split-layer tokens (built without --split-block); "
                             f"stage 2 needs them: rebuild with --split-block B")
        return cache
    from spot_fast.cache.paths import encoder_description
    have, want = m["encoder"], encoder_description(expect)
    keys = ["name", "embed_dim", "image_size", "patch_size"] + (["depth"] if need_split_tokens else [])
    problems = [k for k in keys if have[k] != want[k]]
    if problems:
        raise CacheError(f"cache {path} does not fit the model ({', '.join(problems)} differ): the cache has "
                         f"{_describe(have)}, the model expects {_describe(want)}; build a cache for "
                         f"this encoder or pick the matching config")
    if need_split_tokens:
        if not cache.has_split_tokens:
            raise CacheError(f"cache {path} holds no split-layer tokens, but stage 2 needs the tokens "
                             f"entering block {expect.split_block}: rebuild with --split-block {expect.split_block}")
        if cache.split_block != expect.split_block:
            raise CacheError(f"cache {path} holds the tokens entering block {cache.split_block}, the model "
                             f"fine-tunes from block {expect.split_block}: rebuild with --split-block "
                             f"{expect.split_block} or set encoder.split_block={cache.split_block}")
    return cache


# ----------------------------------------------------------------------------- shared helpers

def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
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


class _Rows:
    """Columns of selected rows (stored dtypes), concatenated and sliced as one unit."""

    def __init__(self, cols: dict[str, np.ndarray | list]):
        self.cols = cols

    def __len__(self) -> int:
        return len(self.cols["index"])

    @staticmethod
    def cat(parts: list["_Rows"]) -> "_Rows":
        nonempty = [p for p in parts if len(p)]
        if len(nonempty) <= 1:
            return nonempty[0] if nonempty else parts[0]
        parts = nonempty
        out = {}
        for k, v in parts[0].cols.items():
            out[k] = sum((p.cols[k] for p in parts), []) if isinstance(v, list) else \
                np.concatenate([p.cols[k] for p in parts])
        return _Rows(out)

    def slice(self, a: int, b: int) -> "_Rows":
        return _Rows({k: v[a:b] for k, v in self.cols.items()})


def _to_batch(rows: _Rows, dtype: str, image_id: Callable, pin: bool, out: torch.dtype | None = torch.float32) -> dict:
    """Stored rows -> the batch dict: tokens as `out` (float32; None keeps fp16/bf16), int64
    index/view, masks as tensors. Token tensors are allocated pinned when `pin`."""
    batch = {}
    for name, v in rows.cols.items():
        if name in ("features", "split_tokens"):
            batch[name] = from_stored(v, dtype, out, pin_memory=pin)
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


def _pick_view(tokens: np.ndarray | None, views: np.ndarray) -> np.ndarray | None:
    """(n, V, T, D) -> (n, T, D): row i's view views[i]."""
    return None if tokens is None else tokens[np.arange(len(views)), views]


def epoch_views(seed: int, epoch: int, num_rows: int, num_views: int) -> np.ndarray:
    """The view every row shows in this epoch (shared by TrainReader and WdsReader)."""
    return np.random.default_rng([seed, epoch, 0]).integers(0, num_views, size=num_rows)


# ----------------------------------------------------------------------------- training

class TrainReader:
    """Training batches: every image once per epoch, one random view, shuffled.

    Determinism: the order and the views depend only on (seed, epoch, rank, world size).
    Shuffling is two-level so that reads stay whole-chunk: the shard order is permuted, then
    the rows of `window` consecutive shards are permuted in memory (leftovers carry over).
    Under DDP, rank r takes every w-th shard of the permuted order (disjoint), and all ranks stop
    after the same number of images (the smallest rank's count), so they run the same number of
    steps. A background thread builds batches `prefetch` ahead; `read_threads` read the next
    window's chunks meanwhile.
    Yields dict(features (B, N, D), split_tokens (B, T, D) if present and wanted, image_id list,
    view (B,) int64, index (B,) int64 source row). Tokens are float32 unless `dtype=None`, which
    keeps the stored fp16/bf16 (half the host memory traffic: convert on the GPU).
    """

    def __init__(self, cache: Cache, batch_size: int, *, seed: int = 0, epoch: int = 0,
                 rank: int | None = None, world_size: int | None = None, window: int = 4,
                 drop_last: bool = True, split_tokens: bool | None = None, dtype: torch.dtype | None = torch.float32,
                 pin_memory: bool | None = None, prefetch: int = 2, read_threads: int = 2):
        self.cache, self.batch_size, self.seed, self.epoch = cache, batch_size, seed, epoch
        self.rank, self.world = _rank_world(rank, world_size)
        self.window, self.drop_last, self.prefetch = max(1, window), drop_last, prefetch
        self.read_threads, self.dtype = max(1, read_threads), dtype
        if split_tokens and not cache.has_split_tokens:
            raise CacheError(f"cache {cache.path} holds no split-layer tokens (built without --split-block)")
        self.split_tokens = cache.has_split_tokens if split_tokens is None else split_tokens
        self.pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.nonempty = [s["index"] for s in cache.shards if s["images"] > 0]
        if len(self.nonempty) < self.world:
            raise CacheError(f"cache {cache.path} has {len(self.nonempty)} non-empty shards, fewer than the "
                             f"{self.world} ranks: rebuild it with a smaller --chunk-images")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, epoch: int) -> tuple[list[int], int]:
        """(this rank's shards in reading order, images this rank yields) for `epoch`."""
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(self.nonempty)
        counts = [sum(self.cache.shards[k]["images"] for k in order[r::self.world]) for r in range(self.world)]
        return [int(k) for k in order[self.rank::self.world]], min(counts)

    def __len__(self) -> int:
        _, limit = self.plan(self.epoch)
        return limit // self.batch_size if self.drop_last else -(-limit // self.batch_size)

    def _read(self, k: int) -> Shard:
        return self.cache.read_shard(k, ("features", "split_tokens") if self.split_tokens else ("features",))

    def _windows(self, shards: list[int], pool: ThreadPoolExecutor) -> Iterator[list[Shard]]:
        """The shards, `window` at a time, the next window read while the current one is used."""
        groups = [shards[w:w + self.window] for w in range(0, len(shards), self.window)]
        ahead = [pool.submit(self._read, k) for k in groups[0]] if groups else []
        for g in range(len(groups)):
            current = [f.result() for f in ahead]
            ahead = [pool.submit(self._read, k) for k in groups[g + 1]] if g + 1 < len(groups) else []
            yield current

    def _batches(self, epoch: int) -> Iterator[dict]:
        shards, limit = self.plan(epoch)
        views = epoch_views(self.seed, epoch, self.cache.num_rows, self.cache.views)
        rng = np.random.default_rng([self.seed, epoch, 2, self.rank])
        B, done = self.batch_size, 0
        held: list[Shard] = []                              # shards that pending rows point into
        pend_s = pend_r = np.zeros(0, np.int64)             # pending rows: (slot in `held`, row in shard)
        with ThreadPoolExecutor(self.read_threads, thread_name_prefix="cache-read") as pool:
            for window in self._windows(shards, pool):
                slots = np.concatenate([np.full(len(sh), len(held) + j) for j, sh in enumerate(window)])
                rows = np.concatenate([np.arange(len(sh)) for sh in window])
                held += window
                perm = rng.permutation(len(rows))
                pend_s, pend_r = np.concatenate([pend_s, slots[perm]]), np.concatenate([pend_r, rows[perm]])
                while len(pend_s) >= B and done + B <= limit:
                    yield self._gather(held, pend_s[:B], pend_r[:B], views)
                    pend_s, pend_r, done = pend_s[B:], pend_r[B:], done + B
                held, pend_s = _compact(held, pend_s)
                if done + B > limit:
                    break
        if not self.drop_last and len(pend_s) and done < limit:
            n = limit - done
            yield self._gather(held, pend_s[:n], pend_r[:n], views)

    def _gather(self, held: list[Shard], slots: np.ndarray, rows: np.ndarray, views: np.ndarray) -> dict:
        """One batch from rows scattered over the held shards: one copy per token array, then one convert."""
        index = np.array([held[s].rows[r] for s, r in zip(slots, rows)], np.int64)
        v = views[index]
        cols = {"index": index, "view": v, "image_id": [held[s].image_ids[r] for s, r in zip(slots, rows)]}
        for name in ("features", "split_tokens") if self.split_tokens else ("features",):
            first = getattr(held[slots[0]], name)
            out = np.empty((len(index), *first.shape[2:]), first.dtype)
            for s in np.unique(slots):
                m = slots == s
                out[m] = getattr(held[s], name)[rows[m], v[m]]
            cols[name] = out
        return _to_batch(_Rows(cols), self.cache.dtype, self.cache.image_id, self.pin, self.dtype)

    def __iter__(self) -> Iterator[dict]:
        epoch = self.epoch
        return prefetched(lambda: self._batches(epoch), self.prefetch)


def _compact(held: list[Shard], slots: np.ndarray) -> tuple[list[Shard], np.ndarray]:
    """Drop the shards no pending row points into; renumber the slots."""
    keep = np.unique(slots)
    remap = np.zeros(len(held), np.int64)
    remap[keep] = np.arange(len(keep))
    return [held[k] for k in keep], remap[slots]


# ----------------------------------------------------------------------------- evaluation

class EvalReader:
    """Every stored image once, in source order, with ground truth (val caches).

    Yields dict(features (B, N, D) float32, split_tokens if present and wanted, image_id list,
    index (B,), view (B,) zeros, and for val caches instance_mask/class_mask (B, M, M) int64,
    ignore_mask (B, M, M) uint8, jpeg list[bytes]). Train caches give view 0 of each image.
    """

    def __init__(self, cache: Cache, batch_size: int, *, split_tokens: bool | None = None,
                 dtype: torch.dtype | None = torch.float32, pin_memory: bool = False, prefetch: int = 2):
        self.cache, self.batch_size, self.prefetch, self.pin = cache, batch_size, prefetch, pin_memory
        self.dtype = dtype
        self.split_tokens = cache.has_split_tokens if split_tokens is None else split_tokens

    def __len__(self) -> int:
        return -(-self.cache.num_images // self.batch_size)

    def _read(self, k: int) -> _Rows:
        names = ("features", *(("split_tokens",) if self.split_tokens else ()), *MASK_NAMES, "jpeg")
        shard = self.cache.read_shard(k, names)
        zero = np.zeros(len(shard), np.int64)
        cols = {"index": shard.rows, "view": zero, "image_id": shard.image_ids,
                "features": _pick_view(shard.features, zero)}
        if self.split_tokens:
            cols["split_tokens"] = _pick_view(shard.split_tokens, zero)
        if self.cache.has_masks:
            cols.update({n: getattr(shard, n) for n in MASK_NAMES})
            cols["jpeg"] = shard.jpeg
        return _Rows(cols)

    def _batches(self) -> Iterator[dict]:
        B, left = self.batch_size, None
        for s in self.cache.shards:
            if s["images"] == 0:
                continue
            rows = self._read(s["index"])
            rows = rows if left is None else _Rows.cat([left, rows])
            start = 0
            while start + B <= len(rows):
                yield _to_batch(rows.slice(start, start + B), self.cache.dtype, self.cache.image_id, self.pin, self.dtype)
                start += B
            left = rows.slice(start, len(rows))
        if left is not None and len(left):
            yield _to_batch(left, self.cache.dtype, self.cache.image_id, self.pin, self.dtype)

    def __iter__(self) -> Iterator[dict]:
        return prefetched(self._batches, self.prefetch)


# ----------------------------------------------------------------------------- streaming (WebDataset)

class WdsReader:
    """Training batches streamed from WebDataset tar shards: local paths or URLs.

    urls: shard paths/URLs (a list, or one brace pattern like "https://h/shard-{00000..00099}.tar";
    webdataset opens "pipe:..." and http(s) URLs). Shard order is shuffled per (seed, epoch); rank r
    of w reads every w-th shard; then a `shuffle_buffer`-sample buffer shuffles within the stream.
    With `manifest` (a local wds cache's), every rank stops after the smallest rank's image count
    and the views match TrainReader's for the same (seed, epoch); without it the view of each
    image is drawn from (seed, epoch, row) and ranks may yield different counts.
    Yields the same dicts as TrainReader.
    """

    def __init__(self, urls: str | list[str], batch_size: int, *, seed: int = 0, epoch: int = 0,
                 rank: int | None = None, world_size: int | None = None, shuffle_buffer: int = 1000,
                 manifest: dict | None = None, num_views: int | None = None, drop_last: bool = True,
                 split_tokens: bool = True, dtype: torch.dtype | None = torch.float32,
                 pin_memory: bool | None = None, prefetch: int = 2):
        from webdataset.shardlists import expand_urls
        self.urls = expand_urls(urls) if isinstance(urls, str) else [str(u) for u in urls]
        self.batch_size, self.seed, self.epoch, self.buffer = batch_size, seed, epoch, shuffle_buffer
        self.rank, self.world = _rank_world(rank, world_size)
        self.manifest, self.drop_last, self.prefetch = manifest, drop_last, prefetch
        self.split_tokens, self.out_dtype = split_tokens, dtype
        self.pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.views = manifest["views"] if manifest else num_views
        self.dtype = manifest["dtype"] if manifest else "fp16"
        self.int_ids = bool(manifest) and manifest["image_id_type"] == "int"
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

    def _view(self, row: int, views: np.ndarray | None, num_views: int) -> int:
        if views is not None:
            return int(views[row])
        return int(np.random.default_rng([self.seed, self.epoch, 3, row]).integers(num_views))

    def _samples(self, epoch: int) -> Iterator[dict]:
        import webdataset as wds
        shards, limit = self.plan(epoch)
        views = None
        if self.manifest:
            views = epoch_views(self.seed, epoch, self.manifest["counts"]["source_images"], self.views)
        rng = random.Random(f"{self.seed}-{epoch}-{self.rank}")
        pipe = wds.DataPipeline(wds.SimpleShardList([self.urls[i] for i in shards]), wds.tarfile_to_samples(),
                                wds.shuffle(self.buffer, initial=self.buffer, rng=rng))
        for n, raw in enumerate(pipe):
            if limit is not None and n >= limit:
                return
            sample = wds_store.decode_sample({k: v for k, v in raw.items() if not k.startswith("__")})
            row = int(raw["__key__"])
            feats = sample["features"]                      # (V, N, D)
            v = self._view(row, views, self.views or feats.shape[0])
            out = {"index": row, "view": v, "image_id": sample["image_id"], "features": feats[v]}
            if self.split_tokens and "split_tokens" in sample:
                out["split_tokens"] = sample["split_tokens"][v]
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
        for k in ("features", "split_tokens"):
            if k in cols:
                cols[k] = np.stack(cols[k])
        return _to_batch(_Rows(cols), self.dtype, image_id, self.pin, self.out_dtype)

    def __iter__(self) -> Iterator[dict]:
        epoch = self.epoch
        return prefetched(lambda: self._batches(epoch), self.prefetch)
