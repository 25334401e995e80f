"""The feature cache: frozen-encoder tokens computed once, stored as zarr v3 or WebDataset shards.

    build:  build_cache(source, encoder, spec, out)      (CLI: `spot-fast cache DATASET --root ...`)
    read:   cache = open_cache(path, expect=cfg); cache.train_reader(64) / cache.eval_reader(64)
    stream: WdsReader(urls, 64)
    check:  verify(path) -> problems
"""
from spot_fast.cache.build import BuildResult, build_cache, find_cached
from spot_fast.cache.manifest import CacheError, read_manifest, verify
from spot_fast.cache.paths import CacheSpec, cache_base_dir
from spot_fast.cache.reader import Cache, EvalReader, TrainReader, WdsReader, open_cache

__all__ = ["BuildResult", "Cache", "CacheError", "CacheSpec", "EvalReader", "TrainReader", "WdsReader",
           "build_cache", "cache_base_dir", "find_cached", "open_cache", "read_manifest",
           "verify"]
