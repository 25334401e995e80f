"""A finished cache with its readers, and the fit check against a model.

    cache = open_cache(path, expect=cfg)                     # CacheError if it does not fit
    cache = check_fits(Cache(path), cfg)                     # the same, the manifest read once first
    cache.train_reader(64, seed=0, epoch=e)                  # see train_reader.py
    cache.eval_reader(64)                                    # see eval_reader.py

Random-init caches (built with --random-init) are refused unless `allow_random_init=True`:
features of an untrained ViT train nothing useful, and a cache built for a test must never be
mistaken for a real one. Layers: store.py (files) <- the readers <- this module.
"""
from __future__ import annotations

import os

from spot_fast.cache.eval_reader import EvalReader
from spot_fast.cache.manifest import CacheError
from spot_fast.cache.paths import encoder_description
from spot_fast.cache.store import CacheStore
from spot_fast.cache.train_reader import TrainReader
from spot_fast.cache.wds_reader import WdsReader
from spot_fast.config import EncoderConfig, SPOTConfig


class Cache(CacheStore):
    """A finished cache: its files (CacheStore) and readers over them."""

    def train_reader(self, batch_size: int, **kw):
        return TrainReader(self, batch_size, **kw)

    def eval_reader(self, batch_size: int, **kw):
        return EvalReader(self, batch_size, **kw)

    def wds_reader(self, batch_size: int, check: bool = True, **kw):
        """A WdsReader over this cache's tars; `check` hashes them first (once per process), as the
        other readers do on first read: a stream cannot be checked before it is decoded."""
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
    """`Cache(path)` checked against the model `expect` (see `check_fits`)."""
    return check_fits(Cache(path), expect, need_split_tokens=need_split_tokens, allow_random_init=allow_random_init)


def check_fits(cache: Cache, expect: EncoderConfig | SPOTConfig | None = None, need_split_tokens: bool = False,
               allow_random_init: bool = False) -> Cache:
    """`cache` when it fits the model `expect` (its manifest as already read: nothing is read again).

    Raises CacheError naming both sides when the encoder name, feature width, image size, patch
    size (grid) or -- for stage 2 -- split block or depth differ, when split-layer tokens are
    needed but missing (`need_split_tokens`, implied by a stage-2 SPOTConfig), or when the cache
    was built from a random-init encoder and `allow_random_init` is False.
    """
    path, m = cache.path, cache.manifest
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
