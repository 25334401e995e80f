"""The data the bench reads: the reference's COCO-format folder and spot-fast's feature caches.

Without `--cache`, `make_data` writes both into a temporary folder: the COCO-format data of
`spot_fast.bench.reference.data` and, from the same images through a random-init encoder of the
preset's shape, a train cache (split tokens included, for stage 2) and a val cache (masks
included, for evaluation), each holding enough images that no timed step waits for an epoch to
restart. With `--cache PATH`, `spot_fast.bench.config.bench_caches` reads it by the one rule of
every command (`spot_fast.cache.resolve_cache`); `check_cache` holds each cache to the preset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from spot_fast.bench.reference.data import write_dataset
from spot_fast.config import SPOTConfig
from spot_fast.errors import UserError
from spot_fast.threads import usable_cores


class BenchCacheError(UserError, ValueError):
    """A --cache that the bench cannot use; the message names it and the fix."""


@dataclass
class BenchData:
    root: Path                  # the reference's COCO-format folder
    train_cache: Path           # spot-fast's train cache (split tokens included)
    val_cache: Path | None      # spot-fast's val cache (masks), None when a --cache has none


def check_cache(path: Path, cfg: SPOTConfig, split_tokens: bool = False, cli: bool = False) -> None:
    """A one-line BenchCacheError unless the cache fits the preset (geometry, width, and split
    tokens where `split_tokens`: stage 2 and evaluation read a stage-2 model's inputs); `cli`:
    the message names options (`--preset`), else arguments (`preset=`)."""
    from spot_fast.cache import CacheError, open_cache
    try:
        open_cache(path, expect=cfg, need_split_tokens=split_tokens, allow_random_init=True)
    except CacheError as err:
        where, pick = (f"--cache {path}", "--preset") if cli else (f"cache={str(path)!r}", "preset=")
        raise BenchCacheError(f"{where}: {str(err).splitlines()[0]} (or pick the preset the cache was built "
                              f"for with {pick})") from None


def make_data(folder: Path, cfg: SPOTConfig, batch: int, steps: int, eval_steps: int, *, mask_size: int,
              loader_workers: int, device, distinct: int = 16) -> BenchData:
    """Write the reference's data and build spot-fast's caches under `folder` (see the module doc).
    steps: train batches any one fast row reads; eval_steps: val batches; the reference loaders
    also prefetch 2 batches per worker."""
    from spot_fast.cache import CacheSpec, build_cache
    from spot_fast.data.sources import open_source
    from spot_fast.encoders import FrozenEncoder
    size = cfg.encoder.image_size
    entries = batch * (steps + 2 * loader_workers + 2)
    train_images = math.ceil(batch * (steps + 1) / 2)                  # 2 views per image
    val_images = batch * (eval_steps + 1)
    root = write_dataset(folder / "data", distinct, entries, short_side=max(size, 480) if size >= 224 else size,
                         cache_entries=max(train_images, val_images))
    encoder = FrozenEncoder.create(cfg.encoder, random_init=True, seed=0)
    caches = {}
    for split, images in (("train", train_images), ("val", val_images)):
        source = open_source("coco", root / "cache", split, image_size=size, mask_size=mask_size)
        source.ids = source.ids[:images]
        spec = CacheSpec("coco", str(root / "cache"), split, cfg.encoder, encoder.weights_id,
                         split_block=cfg.encoder.split_block, mask_size=mask_size, chunk_images=64,
                         content=f"bench-{split}-{images}")
        caches[split] = build_cache(source, encoder, spec, folder / f"cache-{split}", batch_size=16,
                                    num_workers=min(4, usable_cores() - 1), device=device, progress=False).path
    return BenchData(root, caches["train"], caches["val"])
