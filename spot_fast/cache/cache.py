"""A finished cache: its manifest, shard-level access to its arrays, and the fit check against a model.

    cache = open_cache(path, expect=cfg)                     # CacheError if it does not fit
    cache.train_reader(64, seed=0, epoch=e)                  # see train_reader.py
    cache.eval_reader(64)                                    # see eval_reader.py

Random-init caches (built with --random-init) are refused unless `allow_random_init=True`:
features of an untrained ViT train nothing useful, and a cache built for a test must never be
mistaken for a real one. Every shard file is checked against the manifest's fast hash the
first time this process reads it (checks.py).
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from spot_fast.cache import wds_store
from spot_fast.cache.checks import FIRST_READ
from spot_fast.cache.layout import Shard
from spot_fast.cache.manifest import TAIL_FILE, CacheError, read_manifest, shard_owner
from spot_fast.cache.zarr_store import ZarrStore, chunk_file
from spot_fast.config import EncoderConfig, SPOTConfig


@dataclass
class Samples:
    """The stored images of a cache as samples 0..S-1 (source order; skipped rows left out)."""
    rows: np.ndarray          # (S,) int64 source row of each sample
    shard: np.ndarray         # (S,) int64 shard holding it
    pos: np.ndarray           # (S,) int64 its place in the shard's file (zarr: row - start; tar: member order)
    image_ids: list           # (S,) image ids (int when the cache's ids are ints)

    def __len__(self) -> int:
        return len(self.rows)


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
        self._tars: dict[int, dict] = {}         # shard -> tar member index (wds)
        self._maps: dict[str, mmap.mmap] = {}    # relative path -> memory map
        self.ring_pool: dict[tuple, list] = {}   # free TrainReader batch buffers, reused across epochs

    @property
    def has_split_tokens(self) -> bool:
        return self.split_block is not None

    @property
    def has_masks(self) -> bool:
        return "instance_mask" in self.manifest["arrays"]

    @property
    def zarr(self) -> ZarrStore:
        if self._zarr is None:
            self._zarr = ZarrStore(self.path, self.manifest["arrays"], mode="r",
                                   chunk_images=self.manifest["chunk_images"],
                                   raw=self.manifest["compression"] is None)
        return self._zarr

    def shard_file(self, k: int, name: str) -> str:
        """Relative path of the file holding array `name` of shard k."""
        if self.format == "wds":
            return wds_store.shard_name(k)
        return chunk_file(name, len(self.manifest["arrays"][name]["shape"]), k)

    def check_shard(self, k: int, names: tuple[str, ...]) -> None:
        """Hash the files of shard k that hold `names`, once per process; CacheError if one is damaged."""
        s = self.shards[k]
        hashes = s.get("xxh3", s["files"])          # sha256 for caches built before xxh3 was recorded
        rels = dict.fromkeys(self.shard_file(k, n) for n in names if n in self.manifest["arrays"])
        FIRST_READ.ensure(self.path, [(rel, hashes[rel], shard_owner(s)) for rel in rels])

    def read_shard(self, k: int, names: tuple[str, ...] | None = None) -> Shard:
        """The valid rows of shard k (stored dtypes); `names` limits the arrays read (zarr only)."""
        s = self.shards[k]
        self.check_shard(k, tuple(self.manifest["arrays"]) if names is None or self.format == "wds"
                         else ("valid", "image_id", *names))
        if self.format == "wds":
            return wds_store.read_shard(self.path, k, s["start"], s["stop"], self.manifest["arrays"])
        return self.zarr.read(k, s["start"], s["stop"], names)

    @cached_property
    def samples(self) -> Samples:
        """Where every stored image lies (built once: reads the small `valid`/`image_id` arrays or tar headers)."""
        parts = [self._shard_samples(s) for s in self.shards if s["images"] > 0]
        if not parts:
            return Samples(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), [])
        rows, pos, ids = (np.concatenate([p[i] for p in parts]) for i in range(3))
        shard = np.concatenate([np.full(len(p[0]), k, np.int64) for k, p in
                                zip([s["index"] for s in self.shards if s["images"] > 0], parts)])
        return Samples(rows, shard, pos, [self.image_id(x) for x in ids])

    def _shard_samples(self, s: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, positions, raw ids) of the stored images of shard s."""
        k = s["index"]
        if self.format == "wds":
            self.check_shard(k, ("features",))
            members = self.tar_index(k)
            keys = sorted(members)
            ids = [self.tar_map(k)[slice(*_span(members[key]["id.txt"]))].decode() for key in keys]
            return np.array([int(x) for x in keys], np.int64), np.arange(len(keys)), np.array(ids, object)
        self.check_shard(k, ("valid", "image_id"))
        shard = self.zarr.read(k, s["start"], s["stop"], ())
        return shard.rows, shard.rows - s["start"], np.array(shard.image_ids, object)

    def tar_index(self, k: int) -> dict:
        if k not in self._tars:
            self._tars[k] = wds_store.index_tar(self.path / wds_store.shard_name(k))
        return self._tars[k]

    def tar_map(self, k: int) -> mmap.mmap:
        return self.file_map(wds_store.shard_name(k))

    def file_map(self, rel: str) -> mmap.mmap:
        """The file as a copy-on-write memory map: nothing reaches the disk, and numpy/torch may wrap it."""
        if rel not in self._maps:
            with open(self.path / rel, "rb") as f:
                self._maps[rel] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[rel]

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

    def train_reader(self, batch_size: int, **kw):
        from spot_fast.cache.train_reader import TrainReader
        return TrainReader(self, batch_size, **kw)

    def eval_reader(self, batch_size: int, **kw):
        from spot_fast.cache.eval_reader import EvalReader
        return EvalReader(self, batch_size, **kw)

    def wds_reader(self, batch_size: int, check: bool = True, **kw):
        """A WdsReader over this cache's tars; `check` hashes them first (once per process), as the
        other readers do on first read: a stream cannot be checked before it is decoded."""
        from spot_fast.cache.wds_reader import WdsReader
        urls = self.shard_urls()
        if check:
            for s in self.shards:
                self.check_shard(s["index"], ("features",))
        return WdsReader(urls, batch_size, manifest=self.manifest, **kw)


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



def _span(offset_size: tuple[int, int]) -> tuple[int, int]:
    return offset_size[0], offset_size[0] + offset_size[1]
