"""Build a feature cache: run the frozen encoder once over a `Source` and store its tokens.

    spec = CacheSpec("coco", root, "train", EncoderConfig(), weights_id, split_block=8)
    result = build_cache(source, encoder, spec)          # -> BuildResult(path, manifest, ...)

Never loses work: shard k (rows k*C .. k*C+C-1) is written by its store (zarr chunk files or
one tar, each via a tmp name + rename), fsync'd, and then recorded by an atomically written
marker `.shards/shard-XXXXX.json` holding its checksums (writer.py). A rerun skips recorded
shards whose files still match (size + xxh3), rewrites the rest, and ends byte-identical to an
uninterrupted build: every encoder batch lies inside one shard and depends only on that shard,
and nothing written holds a time or a process id. The manifest is written last, with its own
checksum; it alone makes the directory a cache. Non-finite tokens stop the build (`stored`).

Several processes (`torchrun --nproc-per-node G spot-fast cache ...`): rank r builds shards
k = r, r+G, ...; rank 0 merges their markers into the manifest once all ranks are done. A
failing rank stops the others with its error (ranks.py). The output directory must be shared
by all ranks (one machine, or a shared file system).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from spot_fast.cache import zarr_store
from spot_fast.cache.build_io import BuildProgress, SourceItems, list_collate, mask_array, save_tail
from spot_fast.cache.checks import fast_hash
from spot_fast.cache.codec import TOKEN_ARRAYS, merge_stats
from spot_fast.cache.encode import BatchEncoder
from spot_fast.cache.layout import MASK_NAMES, SCALE_NAMES, Shard, array_specs, shard_bounds
from spot_fast.cache.manifest import (BUILD_STATE, MANIFEST, SHARD_MARKERS, TAIL_FILE, CacheError, read_manifest,
                                      shard_owner, write_json_atomic)
from spot_fast.cache.merge import merge, rounded
from spot_fast.cache.paths import CacheSpec, check_existing, encoder_description
from spot_fast.cache.ranks import ERRORS, BuildRanks, default_device, ranks_from_env
from spot_fast.cache.writer import ShardWriter, remove_temporaries
from spot_fast.data.base import Source
from spot_fast.errors import arg
from spot_fast.encoders import FrozenEncoder

# ----------------------------------------------------------------------------- the build

@dataclass
class BuildResult:
    path: Path
    manifest: dict | None               # None on ranks > 0
    already_cached: bool = False
    images_built: int = 0               # encoded by this process in this run
    skipped: list[dict] = field(default_factory=list)   # skipped by this process in this run
    shards_resumed: int = 0             # shards found finished from an earlier run
    rebuilt: list[str] = field(default_factory=list)    # marked shards found damaged and rebuilt
    seconds: float = 0.0


class _Builder:
    """One build process: prepares the directory (rank 0), encodes its shards, merges (rank 0)."""

    def __init__(self, source: Source, encoder: FrozenEncoder, spec: CacheSpec, out: Path,
                 ranks: BuildRanks, device: torch.device, batch_size: int, num_workers: int, progress: bool):
        self.source, self.encoder, self.spec, self.out = source, encoder, spec, out
        self.ranks, self.device = ranks, device
        self.batch_size, self.num_workers, self.progress = batch_size, num_workers, progress
        self.key = spec.key()
        cfg = spec.encoder
        self.views = source.num_views if spec.split == "train" else 1
        self.num_rows = len(source)
        self.encode = BatchEncoder(encoder, spec, device, self.views, source.name)
        self.num_patches, self.dim, self.num_tokens = cfg.num_patches, cfg.feature_dim, self.encode.num_tokens
        self.specs = array_specs(num_rows=self.num_rows, views=self.views, num_patches=self.num_patches,
                                 num_tokens=self.num_tokens, dim=self.dim, dtype=spec.dtype,
                                 with_val=spec.split == "val", mask_size=spec.mask_size,
                                 mask_dtype=spec.mask_dtype)
        self.bounds = shard_bounds(self.num_rows, spec.chunk_images)

    # -- directory ------------------------------------------------------------------------
    def prepare(self) -> None:
        """Rank 0: create or resume the build directory (metadata, tail weights, build state)."""
        out, state_file = self.out, self.out / BUILD_STATE
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot create the cache directory {out}: {e.strerror}; "
                             f"pass a writable --out (or set SPOT_FAST_CACHE_DIR)") from None
        if not os.access(out, os.W_OK):
            raise CacheError(f"the cache directory {out} is not writable: pass another --out")
        state = json.loads(state_file.read_text()) if state_file.is_file() else None
        if state is not None and state["content_key"] != self.key:
            check_existing(self.spec, out)     # names the settings that differ, unless it never got going
            state = {"prepared": False}        # a start of other settings that failed preparing: start over
        if state is None and any(out.iterdir()):
            raise CacheError(f"--out {out} is not empty and is not a spot-fast cache build: "
                             f"choose a new or empty directory")
        if state is not None and state.get("prepared"):
            remove_temporaries(out)
            shutil.rmtree(out / ERRORS, ignore_errors=True)
            return
        for child in out.iterdir():     # an interrupted preparation: start over
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        write_json_atomic(state_file, {"content_key": self.key, "spec": self.spec.to_dict(), "prepared": False})
        if self.spec.format == "zarr":
            zarr_store.create(out, self.specs, self.spec.chunk_images, self.spec.zstd_level(),
                              attrs={"spot_fast_cache": True, "content_key": self.key})
        if self.spec.split_block is not None:
            save_tail(out / TAIL_FILE, self.encoder.tail_state(self.spec.split_block),
                       {"weights": self.spec.weights_id, "split_block": self.spec.split_block})
        (out / SHARD_MARKERS).mkdir(exist_ok=True)
        write_json_atomic(state_file, {"content_key": self.key, "spec": self.spec.to_dict(), "prepared": True})

    def marker(self, k: int) -> Path:
        return self.out / SHARD_MARKERS / f"shard-{k:05d}.json"

    # -- encoding -------------------------------------------------------------------------
    def build(self, result: BuildResult) -> None:
        """Encode and write this rank's unfinished shards."""
        mine = range(self.ranks.rank, len(self.bounds), self.ranks.world_size)
        todo = self.todo(mine, result)
        result.shards_resumed = len(mine) - len(todo)
        try:
            self.run(todo, result)
        except BaseException:
            if self.ranks.world_size == 1:
                remove_temporaries(self.out)
            raise

    def todo(self, mine: range, result: BuildResult) -> list[int]:
        """This rank's shards without a marker, or whose marked files changed on disk since
        (truncated by a machine crash, edited): those are rebuilt, and listed in `result.rebuilt`."""
        out = []
        for k in mine:
            if self.marker(k).is_file():
                problem = self.marked_problem(k)
                if problem is None:
                    continue
                result.rebuilt.append(problem)
                print(f"warning: {problem}: rebuilding it", file=sys.stderr)
                self.marker(k).unlink()
            out.append(k)
        return out

    def marked_problem(self, k: int) -> str | None:
        """Why the files of marked shard k do not match their marker (size, then xxh3), or None."""
        m = json.loads(self.marker(k).read_text())
        for rel, fast in m["xxh3"].items():
            file = self.out / rel
            if not file.is_file():
                return f"{shard_owner(m)} was marked done but {rel} is missing"
            if file.stat().st_size != m["sizes"][rel] or fast_hash(file) != fast:
                return f"{shard_owner(m)} was marked done but {rel} changed on disk (truncated?)"
        return None

    def batches(self, shards: list[int]) -> list[list[int]]:
        """Encoder batches: each inside one shard, cut from the shard's start (rank-independent)."""
        out = []
        for k in shards:
            start, stop = self.bounds[k]
            out += [list(range(b, min(b + self.batch_size, stop))) for b in range(start, stop, self.batch_size)]
        return out

    def _stack(self, name: str, arrays: list[np.ndarray]) -> np.ndarray:
        """Concatenate along rows; an empty (0, ...) array of the layout's shape when there is nothing."""
        if arrays:
            return np.concatenate(arrays)
        spec = self.specs[name]
        return np.zeros((0, *spec["shape"][1:]), spec["dtype"])

    def shard_from(self, k: int, good: list[dict], parts: list[tuple[dict, dict]], skipped: list[dict]) -> Shard:
        """The finished shard k from its good items, their encoded (arrays, stats) and its skipped images."""
        start, stop = self.bounds[k]
        shard = Shard(k, start, stop, np.array([it["index"] for it in good], np.int64),
                      [str(it["id"]) for it in good], skipped=skipped,
                      int_ids=bool(good) and all(isinstance(it["id"], (int, np.integer)) for it in good))
        for name in (*TOKEN_ARRAYS, *SCALE_NAMES):
            if name in self.specs:
                setattr(shard, name, self._stack(name, [arrays[name] for arrays, _ in parts]))
        layers = dict.fromkeys(layer for _, stats in parts for layer in stats)
        shard.stats = {layer: rounded(merge_stats([st[layer] for _, st in parts if layer in st])) for layer in layers}
        if self.spec.split == "val":
            m = self.spec.mask_size
            for name in MASK_NAMES:
                arrays = []
                for it in good:
                    if tuple(it[name].shape) != (m, m):
                        raise CacheError(f"source {self.source.name!r} gave a {tuple(it[name].shape)} {name} "
                                         f"for image {it['id']}, expected ({m}, {m}) (--mask-size)")
                    dtype = "uint8" if name == "ignore_mask" else self.spec.mask_dtype
                    arrays.append(mask_array(it[name], dtype, name, it["id"])[None])
                setattr(shard, name, self._stack(name, arrays))
            shard.jpeg = [it["jpeg"] for it in good]
        return shard

    def run(self, shards: list[int], result: BuildResult) -> None:
        """Encode `shards` (in order) and hand each finished one to the writer thread."""
        batches = self.batches(shards)
        loader = DataLoader(SourceItems(self.source, self.spec.split), batch_sampler=batches,
                            num_workers=self.num_workers, collate_fn=list_collate)
        total = sum(self.bounds[k][1] - self.bounds[k][0] for k in shards)
        items = decoded(loader)         # fork the decode workers before any thread of ours starts
        writer = ShardWriter(self)
        bar = BuildProgress(total, enabled=self.progress and self.ranks.rank == 0,
                        label=f"rank 0/{self.ranks.world_size}" if self.ranks.world_size > 1 else "encoding")
        pending = Counter(b[0] // self.spec.chunk_images for b in batches)    # batches left per shard
        good, parts, skipped = [], [], []
        try:
            with bar:
                for batch in items:
                    writer.check()
                    failed = self.ranks.failure(self.out)
                    if failed:
                        raise CacheError(failed)
                    k = batch[0]["index"] // self.spec.chunk_images
                    ok = [it for it in batch if "bad" not in it]
                    bad = [it["bad"] for it in batch if "bad" in it]
                    if ok:
                        parts.append(self.encode(ok, first_of_shard=not parts))
                    good += ok
                    skipped += bad
                    result.images_built += len(ok)
                    result.skipped += bad
                    bar.advance(len(batch), len(bad))
                    pending[k] -= 1
                    if pending[k] == 0:
                        writer.put(self.shard_from(k, good, parts, skipped))
                        good, parts, skipped = [], [], []
                writer.finish()
        finally:
            writer.stop()

    # -- merging --------------------------------------------------------------------------


def decoded(loader: DataLoader):
    """The decode workers' batches (the workers start here). A worker that died (killed, out of
    memory) stops the build with one line where the batches are read: the shards finished so far
    are kept and the same command resumes. torch's own SIGCHLD handler, which would raise the same
    news wherever the main thread happens to be (in the writer's join, in a cleanup), is put back
    to what it was: the loader then finds the dead worker itself, in `next`."""
    in_main = threading.current_thread() is threading.main_thread() and loader.num_workers > 0
    previous = signal.getsignal(signal.SIGCHLD) if in_main else None
    items = iter(loader)
    if in_main:
        signal.signal(signal.SIGCHLD, previous)
    return _reported(items)


def _reported(items):
    try:
        yield from items
    except (RuntimeError, EOFError, ConnectionError) as e:
        if isinstance(e, RuntimeError) and "DataLoader worker" not in str(e):
            raise
        raise CacheError(f"an image-decoding worker stopped ({e or type(e).__name__}); the finished shards are "
                         f"kept: rerun the same command to resume (with {arg('num_workers', 0)} the images are "
                         f"decoded in this process)") from None


def _failure(step) -> BaseException | None:
    """Run `step()`; the exception it raised (for `BuildRanks.sync` to share), or None."""
    try:
        step()
    except BaseException as e:    # noqa: BLE001 -- handed to BuildRanks.sync, which re-raises it
        return e
    return None


def find_cached(spec: CacheSpec, out: str | os.PathLike | None = None) -> Path | None:
    """The path of the finished cache for `spec` (at `out` or the default place), else None.

    Raises CacheError when `out` holds a finished cache of different content."""
    path = Path(out) if out is not None else spec.default_path()
    if not (path / MANIFEST).is_file():
        return None
    check_existing(spec, path)          # a cache of other content: names the settings that differ
    return path


def build_cache(source: Source, encoder: FrozenEncoder, spec: CacheSpec, out: str | os.PathLike | None = None, *,
                batch_size: int = 32, num_workers: int = 0, device: str | torch.device | None = None,
                progress: bool = True) -> BuildResult:
    """Encode every image of `source` with `encoder` and store the tokens as `spec` says.

    out: the cache directory (default `spec.default_path()`). Returns at once with
    `already_cached=True` when a finished cache of the same content is there. Under torchrun
    (WORLD_SIZE > 1) every rank calls this; the shards are split between them.
    """
    if batch_size < 1 or num_workers < 0:
        raise CacheError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
    t0 = time.perf_counter()
    out = Path(out) if out is not None else spec.default_path()
    if encoder.weights_id != spec.weights_id:
        raise CacheError(f"encoder weights {encoder.weights_id} differ from the spec's {spec.weights_id}")
    if encoder_description(encoder.cfg) != encoder_description(spec.encoder):
        raise CacheError(f"encoder {encoder_description(encoder.cfg)} differs from the spec's "
                         f"{encoder_description(spec.encoder)}")
    if source.split != spec.split:
        raise CacheError(f"source split {source.split!r} differs from the spec's {spec.split!r}")
    if len(source) == 0:
        raise CacheError(f"dataset {spec.dataset} split {spec.split} at {spec.root} has no images")
    if find_cached(spec, out) is not None:
        return BuildResult(out, read_manifest(out), already_cached=True)
    device = torch.device(device) if device is not None else default_device()
    ranks = ranks_from_env(device)
    try:
        encoder = encoder.to(device)
        builder = _Builder(source, encoder, spec, out, ranks, device, batch_size, num_workers, progress)
        ranks.sync(out, _failure(builder.prepare) if ranks.rank == 0 else None, share=False)
        result = BuildResult(out, None)
        ranks.sync(out, _failure(lambda: builder.build(result)))

        def finish():
            result.manifest = merge(builder)
        ranks.sync(out, _failure(finish) if ranks.rank == 0 else None)
    finally:
        ranks.close()
    result.seconds = time.perf_counter() - t0
    return result
