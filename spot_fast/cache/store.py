"""A finished cache on disk: its manifest, where every stored image lies, and shard-level access.

The readers (train_reader.py, eval_reader.py, wds_reader.py) build on `CacheStore`; `cache.py`
stands above them and joins both into `Cache`. Every shard file is checked against the
manifest's fast hash the first time this process reads it (checks.py).
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from spot_fast.cache import wds_store
from spot_fast.cache.checks import FIRST_READ
from spot_fast.cache.layout import Shard
from spot_fast.cache.manifest import TAIL_FILE, CacheError, read_manifest, shard_owner
from spot_fast.cache.zarr_store import ZarrStore, chunk_file


@dataclass
class Samples:
    """The stored images of a cache as samples 0..S-1 (source order; skipped rows left out)."""
    rows: np.ndarray          # (S,) int64 source row of each sample
    shard: np.ndarray         # (S,) int64 shard holding it
    pos: np.ndarray           # (S,) int64 its place in the shard's file (zarr: row - start; tar: member order)
    image_ids: list           # (S,) image ids (int when the cache's ids are ints)

    def __len__(self) -> int:
        return len(self.rows)


class CacheStore:
    """A finished cache: its manifest and shard-level access to its arrays (the readers build on this)."""

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
        self.tables: dict[str, object] = {}      # small slabs held in memory (slabs.TableSlabs)

    @property
    def has_split_tokens(self) -> bool:
        return self.split_block is not None

    @property
    def has_masks(self) -> bool:
        return "instance_mask" in self.manifest["arrays"]

    @property
    def zarr(self) -> ZarrStore:
        """The zarr group, opened once its metadata files (zarr.json) match the manifest's sha256."""
        if self._zarr is None:
            meta = [(rel, sha, "cache metadata") for rel, sha in self.manifest["files"].items()
                    if rel.endswith("zarr.json")]
            FIRST_READ.ensure(self.path, meta)
            try:
                self._zarr = ZarrStore(self.path, self.manifest["arrays"], mode="r",
                                       chunk_images=self.manifest["chunk_images"],
                                       raw=self.manifest["compression"] is None)
            except (ValueError, KeyError, OSError) as e:     # zarr's own errors on unreadable metadata
                raise CacheError(f"cache {self.path}: its zarr metadata cannot be read ({type(e).__name__}); "
                                 f"run `spot-fast cache verify {self.path}`, then rebuild the cache") from None
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
        return load_file(str(self.path / TAIL_FILE))

    def shard_urls(self) -> list[str]:
        if self.format != "wds":
            raise CacheError(f"cache {self.path} is in zarr format; WdsReader needs a --format wds cache")
        return [str(self.path / wds_store.shard_name(s["index"])) for s in self.shards]


def _span(offset_size: tuple[int, int]) -> tuple[int, int]:
    return offset_size[0], offset_size[0] + offset_size[1]
