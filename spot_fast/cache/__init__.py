"""The feature cache: frozen-encoder tokens computed once, stored as zarr v3 or WebDataset shards.

    build:  build_cache(source, encoder, spec, out)      (CLI: `spot-fast cache DATASET --root ...`)
    read:   cache = open_cache(path, expect=cfg); cache.train_reader(64) / cache.eval_reader(64)
    fit:    check_fits(Cache(path), cfg)     (open_cache without reading the manifest again)
    device: for batch in device_batches(cache.train_reader(64, dtype=None), "cuda", torch.bfloat16)
    stream: WdsReader(urls, 64)
    check:  verify(path) -> problems
    splits: build_splits(CacheBuildConfig("coco", root, split="both", dtype="int8"))   (the CLI's build)
    paths:  resolve_cache(path, split="train")      (what `--cache PATH` accepts, on every command)
    8-bit:  --dtype int8 | fp8 (codec.py): stored bytes + per-token scales, dequantised by device_batches;
            FrozenTail.from_cache(cache, cfg): stage-2 targets derived on the device (tail.py)
"""
from spot_fast.cache.build import BuildResult, build_cache, find_cached
from spot_fast.cache.cache import Cache, check_fits, open_cache
from spot_fast.cache.device import device_batches
from spot_fast.cache.eval_reader import EvalReader
from spot_fast.cache.manifest import CacheError, read_manifest, verify
from spot_fast.cache.paths import CacheSpec, cache_base_dir
from spot_fast.cache.resolve import resolve_cache
from spot_fast.cache.sampler import epoch_batches, num_batches
from spot_fast.cache.splits import CacheBuildConfig, CustomEncoder, SplitResult, build_splits
from spot_fast.cache.tail import FrozenTail
from spot_fast.cache.train_reader import TrainReader
from spot_fast.cache.wds_reader import WdsReader

__all__ = ["BuildResult", "Cache", "CacheBuildConfig", "CacheError", "CacheSpec", "CustomEncoder",
           "EvalReader", "FrozenTail", "SplitResult", "TrainReader", "WdsReader", "build_cache",
           "build_splits", "cache_base_dir", "check_fits", "device_batches", "epoch_batches", "find_cached",
           "num_batches", "open_cache", "read_manifest", "resolve_cache", "verify"]
