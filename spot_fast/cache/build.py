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

import contextlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from spot_fast import __version__
from spot_fast.cache import zarr_store
from spot_fast.cache.layout import MASK_NAMES, Shard, array_specs, shard_bounds
from spot_fast.cache.checks import fast_hash
from spot_fast.cache.manifest import (BUILD_STATE, MANIFEST, MASK_DTYPES, SCHEMA_VERSION, SHARD_MARKERS,
                                      TAIL_FILE, CacheError, read_manifest, shard_owner,
                                      to_stored, write_json_atomic, write_manifest)
from spot_fast.cache.paths import CacheSpec, check_existing, encoder_description
from spot_fast.cache.ranks import ERRORS, Ranks, default_device, ranks_from_env
from spot_fast.cache.writer import ShardWriter, remove_temporaries
from spot_fast.data.base import BadImage, Source
from spot_fast.encoders import FrozenEncoder, file_sha256

# ----------------------------------------------------------------------------- reading the source

class _SourceItems(Dataset):
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


def _list_collate(items: list[dict]) -> list[dict]:
    return items


def _mask_array(mask: torch.Tensor, dtype: str, what: str, image_id) -> np.ndarray:
    info = np.iinfo(MASK_DTYPES[dtype])
    lo, hi = int(mask.min()), int(mask.max())
    if lo < info.min or hi > info.max:
        raise CacheError(f"image {image_id}: {what} values {lo}..{hi} do not fit --mask-dtype {dtype}; "
                         f"rerun with --mask-dtype int16")
    return mask.numpy().astype(MASK_DTYPES[dtype])


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
                 ranks: Ranks, device: torch.device, batch_size: int, num_workers: int, progress: bool):
        self.source, self.encoder, self.spec, self.out = source, encoder, spec, out
        self.ranks, self.device = ranks, device
        self.batch_size, self.num_workers, self.progress = batch_size, num_workers, progress
        self.key = spec.key()
        cfg = spec.encoder
        self.views = source.num_views if spec.split == "train" else 1
        self.num_rows = len(source)
        self.num_patches, self.dim = cfg.num_patches, cfg.feature_dim
        self.num_tokens = None if spec.split_block is None else encoder.num_prefix_tokens + cfg.num_patches
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
            check_existing(self.spec, out)     # names the settings that differ
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
            _save_tail(out / TAIL_FILE, self.encoder.tail_state(self.spec.split_block),
                       {"weights": self.spec.weights_id, "split_block": self.spec.split_block})
        (out / SHARD_MARKERS).mkdir(exist_ok=True)
        write_json_atomic(state_file, {"content_key": self.key, "spec": self.spec.to_dict(), "prepared": True})

    def marker(self, k: int) -> Path:
        return self.out / SHARD_MARKERS / f"shard-{k:05d}.json"

    # -- encoding -------------------------------------------------------------------------
    def build(self, result: BuildResult) -> None:
        """Encode and write this rank's unfinished shards."""
        mine = range(self.ranks.rank, len(self.bounds), self.ranks.world)
        todo = self.todo(mine, result)
        result.shards_resumed = len(mine) - len(todo)
        try:
            self.run(todo, result)
        except BaseException:
            if self.ranks.world == 1:
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

    def encode(self, items: list[dict]) -> dict[str, np.ndarray]:
        """Stored-dtype token arrays of the good items of one batch."""
        first = items[0]["views"]
        views = torch.empty((len(items), *first.shape), dtype=first.dtype,
                            pin_memory=self.device.type == "cuda")     # pinned once, after stacking
        torch.stack([it["views"] for it in items], out=views)            # (B, V, 3, S, S)
        b, v = views.shape[:2]
        if v != self.views:
            raise CacheError(f"source {self.source.name!r} gave {v} views for image {items[0]['id']}, "
                             f"but says num_views = {self.views}")
        x = views.flatten(0, 1).to(self.device, non_blocking=True)    # (B*V, 3, S, S)
        autocast = contextlib.nullcontext()
        if self.spec.autocast is not None:
            dt = torch.bfloat16 if self.spec.autocast == "bf16" else torch.float16
            autocast = torch.autocast(self.device.type, dtype=dt)
        with torch.inference_mode(), autocast:
            tokens = self.encoder(x, split_block=self.spec.split_block)
        out = {}
        if self.num_tokens is not None:     # checked first: the earlier layer names where a NaN began
            out["split_tokens"] = self.stored(tokens.split.reshape(b, v, self.num_tokens, self.dim), items,
                                              f"split (input of block {self.spec.split_block})")
        out["features"] = self.stored(tokens.final.reshape(b, v, self.num_patches, self.dim), items, "final")
        return out

    def stored(self, tokens: torch.Tensor, items: list[dict], layer: str) -> np.ndarray:
        """(B, V, L, D) tokens in the stored dtype; CacheError naming the image and layer if any value is
        not finite after the cast (NaN/inf from the encoder, or beyond fp16's range)."""
        a = to_stored(tokens, self.spec.dtype)
        finite = torch.isfinite(tokens).flatten(1).all(1).cpu()
        if self.spec.dtype == "fp16":
            finite &= torch.from_numpy(np.isfinite(a).reshape(len(a), -1).all(1))
        if bool(finite.all()):
            return a
        i = int((~finite).nonzero()[0, 0])
        src = "non-finite values (NaN/inf)" if not torch.isfinite(tokens[i]).all() else \
            "values beyond fp16's range (|x| > 65504), inf once stored as fp16"
        fix = "store with --dtype bf16 or fp32" if "fp16" in src else "check the encoder weights (--weights)"
        raise CacheError(f"image {items[i]['id']} (row {items[i]['index']}) of dataset {self.spec.dataset}: "
                         f"the encoder's {layer} tokens hold {src}; nothing is stored for it: {fix}, then "
                         f"rerun the same command to resume")

    def _stack(self, name: str, arrays: list[np.ndarray]) -> np.ndarray:
        """Concatenate along rows; an empty (0, ...) array of the layout's shape when there is nothing."""
        if arrays:
            return np.concatenate(arrays)
        spec = self.specs[name]
        return np.zeros((0, *spec["shape"][1:]), spec["dtype"])

    def shard_from(self, k: int, good: list[dict], parts: list[dict], skipped: list[dict]) -> Shard:
        """The finished shard k from its good items, their encoded parts and its skipped images."""
        start, stop = self.bounds[k]
        shard = Shard(k, start, stop, np.array([it["index"] for it in good], np.int64),
                      [str(it["id"]) for it in good], self._stack("features", [p["features"] for p in parts]),
                      skipped=skipped,
                      int_ids=bool(good) and all(isinstance(it["id"], (int, np.integer)) for it in good))
        if self.num_tokens is not None:
            shard.split_tokens = self._stack("split_tokens", [p["split_tokens"] for p in parts])
        if self.spec.split == "val":
            m = self.spec.mask_size
            for name in MASK_NAMES:
                arrays = []
                for it in good:
                    if tuple(it[name].shape) != (m, m):
                        raise CacheError(f"source {self.source.name!r} gave a {tuple(it[name].shape)} {name} "
                                         f"for image {it['id']}, expected ({m}, {m}) (--mask-size)")
                    dtype = "uint8" if name == "ignore_mask" else self.spec.mask_dtype
                    arrays.append(_mask_array(it[name], dtype, name, it["id"])[None])
                setattr(shard, name, self._stack(name, arrays))
            shard.jpeg = [it["jpeg"] for it in good]
        return shard

    def run(self, shards: list[int], result: BuildResult) -> None:
        """Encode `shards` (in order) and hand each finished one to the writer thread."""
        batches = self.batches(shards)
        loader = DataLoader(_SourceItems(self.source, self.spec.split), batch_sampler=batches,
                            num_workers=self.num_workers, collate_fn=_list_collate)
        total = sum(self.bounds[k][1] - self.bounds[k][0] for k in shards)
        items = iter(loader)            # fork the decode workers before any thread of ours starts
        writer = ShardWriter(self)
        bar = _Progress(total, enabled=self.progress and self.ranks.rank == 0,
                        label=f"rank 0/{self.ranks.world}" if self.ranks.world > 1 else "encoding")
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
                        parts.append(self.encode(ok))
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
    def merge(self) -> dict:
        """Rank 0, after all ranks are done: the manifest from the shard markers."""
        shards, skipped, int_ids = [], [], True
        for k in range(len(self.bounds)):
            if not self.marker(k).is_file():
                raise CacheError(f"shard {k} of {self.out} was not built (a build process failed?): "
                                 f"rerun the same command to finish it")
            m = json.loads(self.marker(k).read_text())
            shards.append({key: m[key] for key in ("index", "start", "stop", "images", "files", "xxh3")})
            skipped += m["skipped"]
            int_ids &= m["int_ids"] or m["images"] == 0
        meta = ["zarr.json"] + [f"{n}/zarr.json" for n in self.specs] if self.spec.format == "zarr" else []
        if self.spec.split_block is not None:
            meta.append(TAIL_FILE)
        spec, cfg = self.spec, self.spec.encoder
        stored = sum(s["images"] for s in shards)
        manifest = {
            "schema_version": SCHEMA_VERSION, "complete": True, "spot_fast_version": __version__,
            "content_key": self.key, "dataset": spec.dataset, "root": spec.root, "split": spec.split,
            "source_options": spec.source_options, "content": spec.content, "format": spec.format,
            "encoder": encoder_description(cfg), "weights": spec.weights_id, "random_init": spec.random_init,
            "image_size": cfg.image_size, "patch_size": cfg.spec.patch_size,
            "grid": [cfg.grid_size, cfg.grid_size], "num_patches": cfg.num_patches, "feature_dim": cfg.feature_dim,
            "num_prefix_tokens": self.encoder.num_prefix_tokens,
            "views": self.views, "views_spec": self.source.views_spec(),
            "layers": {"final": f"output of block {cfg.spec.depth - 1}, no final norm, CLS/registers dropped",
                       "split_block": spec.split_block,
                       "split_tokens": None if spec.split_block is None else
                       f"input of block {spec.split_block}, CLS/registers kept"},
            "dtype": spec.dtype, "autocast": spec.autocast,
            "stored_dtype": self.specs["features"]["dtype"] + (" (bfloat16 bits)" if spec.dtype == "bf16" else ""),
            "mask_size": spec.mask_size if spec.split == "val" else None,
            "mask_dtype": spec.mask_dtype if spec.split == "val" else None,
            "chunk_images": spec.chunk_images, "compression": spec.compression,
            "image_id_type": "int" if int_ids else "str",
            "counts": {"source_images": self.num_rows, "images": stored, "skipped": len(skipped),
                       "shards": len(shards)},
            "skipped": sorted(skipped, key=lambda s: s["index"]),
            "arrays": self.specs,
            "files": {rel: file_sha256(self.out / rel) for rel in meta},
            "shards": shards,
        }
        write_manifest(self.out, manifest)
        shutil.rmtree(self.out / SHARD_MARKERS, ignore_errors=True)
        shutil.rmtree(self.out / ERRORS, ignore_errors=True)
        (self.out / BUILD_STATE).unlink(missing_ok=True)
        return manifest


def _failure(step) -> BaseException | None:
    """Run `step()`; the exception it raised (for `Ranks.sync` to share), or None."""
    try:
        step()
    except BaseException as e:    # noqa: BLE001 -- handed to Ranks.sync, which re-raises it
        return e
    return None


def _save_tail(path: Path, state: dict[str, torch.Tensor], info: dict) -> None:
    """The tail weights as safetensors. Metadata is ONE key: safetensors writes its metadata map in
    hash order, which differs between processes when there are several keys (not byte-stable)."""
    from safetensors.torch import save_file
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp),
              metadata={"spot_fast": json.dumps(info, sort_keys=True)})
    os.replace(tmp, path)


class _Progress:
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

        def merge():
            result.manifest = builder.merge()
        ranks.sync(out, _failure(merge) if ranks.rank == 0 else None)
    finally:
        ranks.close()
    result.seconds = time.perf_counter() - t0
    return result
