"""Build the caches of a dataset's splits in one call: what `spot-fast cache DATASET ...` and the demo run.

    results = build_splits(CacheBuildConfig("coco", "/data/coco", split="both", split_block=8, dtype="int8"))
    results["val"].path          # <out>/val, or the default place of the val cache

Every split is checked (settings, dataset files, a sample of images) before any is encoded, so a
bad val never costs a train build; the encoder is created once, only when some split needs it.
A folder that already holds a split's cache of the same content is kept as it is.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from spot_fast.cache.build import BuildResult, build_cache, find_cached
from spot_fast.cache.manifest import CacheError
from spot_fast.cache.paths import CacheSpec, check_existing
from spot_fast.cache.ranks import default_device, ranks_from_env
from spot_fast.config import EncoderConfig
from spot_fast.data.sources import SOURCES, check_readable, open_source, source_options
from spot_fast.encoders import FrozenEncoder, resolve_weights


@dataclass
class CacheBuildConfig:
    """One `spot-fast cache` command: which splits of which dataset, with which encoder, stored how."""
    dataset: str                        # coco | voc | movi | folder | synthetic
    root: str | os.PathLike             # dataset root directory
    split: str = "both"                 # train | val | both (both: out/train and out/val)
    out: str | os.PathLike | None = None  # cache folder (None: the default place of each split's cache)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)   # architecture and input resolution
    weights: str | os.PathLike | None = None  # encoder weights file (None: the local HF / torch-hub cache)
    random_init: bool = False           # random encoder weights (tests, demo; the cache is marked so)
    seed: int = 0                       # seed of the random-init weights
    split_block: int | None = None      # also store the tokens entering this block (stage 2); None: not
    dtype: str = "fp16"                 # token storage: fp16 | bf16 | fp32 | fp8 | int8 (codec.py)
    format: str = "zarr"                # zarr | wds
    compression: str | None = None      # zarr only: None | "zstd" | "zstd:<level>"
    chunk_images: int = 64              # images per shard
    mask_size: int = 320                # ground-truth mask resolution (val)
    mask_dtype: str = "uint8"           # instance/class mask storage: uint8 | int16
    autocast: str | None = None         # run the encoder under autocast: None | "bf16" | "fp16"
    source_options: dict = field(default_factory=dict)   # dataset options (open_source keywords)
    batch_size: int = 64                # images per encoder forward
    num_workers: int | None = None      # image-decoding DataLoader workers (None: min(4, usable cores))
    device: str | None = None           # None: cuda:LOCAL_RANK if present, else cpu
    progress: bool = True               # progress bar on rank 0

    def splits(self) -> list[str]:
        """The splits to build, refused up front when the dataset lacks one (a folder has no val)."""
        if self.split not in ("train", "val", "both"):
            raise CacheError(f"split must be train, val or both, got {self.split!r}")
        if self.dataset not in SOURCES:
            raise CacheError(f"unknown dataset {self.dataset!r}: use one of {', '.join(SOURCES)}")
        wanted = ["train", "val"] if self.split == "both" else [self.split]
        has = SOURCES[self.dataset].SPLITS
        missing = [s for s in wanted if s not in has]
        if missing:
            raise CacheError(f"split {self.split}: dataset {self.dataset} has no {' or '.join(missing)} split "
                             f"(it has no ground truth); use split={' or '.join(has)}")
        return wanted

    def path(self, split: str, spec: CacheSpec) -> Path:
        if self.out is None:
            return spec.default_path()
        return Path(self.out) / split if self.split == "both" else Path(self.out)

    def spec(self, split: str, weights_id: str) -> CacheSpec:
        unknown = sorted(set(self.source_options) - set(source_options(self.dataset)))
        if unknown:
            raise CacheError(f"dataset {self.dataset} has no option {unknown[0]!r}; it takes "
                             f"{', '.join(source_options(self.dataset)) or 'none'}")
        return CacheSpec(self.dataset, str(self.root), split, self.encoder, weights_id, split_block=self.split_block,
                         dtype=self.dtype, format=self.format, chunk_images=self.chunk_images,
                         compression=self.compression, mask_size=self.mask_size, mask_dtype=self.mask_dtype,
                         autocast=self.autocast, source_options=dict(self.source_options))


@dataclass
class CustomEncoder:
    """An encoder made by the caller (the demo's sin-cos ViT): its weights id, and how to make it."""
    weights_id: str                         # recorded in the cache key and manifest
    make: Callable[[], FrozenEncoder]       # called once, only when some split needs encoding


@dataclass
class SplitResult:
    path: Path                              # the split's cache folder
    result: BuildResult | None              # None: a finished cache of the same content was there


def build_splits(cfg: CacheBuildConfig, encoder: CustomEncoder | None = None,
                 say: Callable[[str], None] = print, warn: Callable[[str], None] = print) -> dict[str, SplitResult]:
    """Build (or find) the cache of every split `cfg` names; split -> SplitResult.

    `encoder`: a caller-made encoder instead of `cfg.weights` / `cfg.random_init`. `say` gets the
    progress lines (rank 0 only under torchrun), `warn` the dataset's warnings."""
    splits = cfg.splits()
    if cfg.random_init and cfg.weights is not None:
        raise CacheError(f"weights={cfg.weights} and random_init=True exclude each other: pass one of them")
    resolved = None if encoder is not None else resolve_weights(cfg.encoder, cfg.weights, cfg.random_init, cfg.seed)
    weights_id = encoder.weights_id if encoder is not None else resolved[1]
    num_workers = min(4, len(os.sched_getaffinity(0))) if cfg.num_workers is None else cfg.num_workers
    device = default_device() if cfg.device is None else torch.device(cfg.device)
    main = int(os.environ.get("RANK", "0")) == 0
    ranks = ranks_from_env(device)     # once for all splits; build_cache reuses the group
    out: dict[str, SplitResult] = {}
    try:
        todo = []       # every split is checked before any is encoded
        for split in splits:
            spec = cfg.spec(split, weights_id)
            path = cfg.path(split, spec)
            check_existing(spec, path)
            if find_cached(spec, path) is not None:
                if main:
                    say(f"already cached: {path}")
                out[split] = SplitResult(path, None)
                continue
            source = open_source(spec.dataset, spec.root, split, image_size=spec.encoder.image_size,
                                 mask_size=spec.mask_size, **spec.source_options)
            for warning in source.warnings if main else ():
                warn(warning)
            check_readable(source)
            todo.append((spec, path, source))
        model = None
        if todo:
            model = encoder.make() if encoder is not None else FrozenEncoder.create(cfg.encoder, seed=cfg.seed,
                                                                                  resolved=resolved)
        for spec, path, source in todo:
            if main:
                say(f"caching {spec.dataset} {spec.split}: {len(source)} images, encoder {spec.encoder.name} "
                    f"({spec.weights_id[:19]}) -> {path}")
            try:
                result = build_cache(source, model, spec, path, batch_size=cfg.batch_size,
                                     num_workers=num_workers, device=device, progress=cfg.progress)
            except OSError as e:
                raise CacheError(write_failure(e, path)) from e
            out[spec.split] = SplitResult(path, result)
    finally:
        ranks.close()
    return out


def write_failure(e: OSError, out: Path) -> str:
    """What a failed write during a build means, and how to resume (finished shards are kept)."""
    where = e.filename or out
    if e.errno == errno.ENOENT:
        why = (f"{where} vanished while the build ran (deleted by another process?): rerun the same "
               f"command; it rebuilds what is missing")
    else:
        why = (f"cannot write the cache ({where}): {e.strerror or e}. Fix this (free space, permissions, or "
               f"another output folder) and rerun the same command to resume")
    return why + " (finished shards are kept)."
