"""What a `--cache PATH` may be, one rule for every command (train, eval, bench, predict):

- a `--split both` folder (PATH/train and PATH/val, each a cache): the split asked for is taken;
- a cache of one split (PATH/manifest.json): taken when it is the split asked for and the caller
  does not need both splits; otherwise the error names the option that takes it on its own.

    train_path = resolve_cache(path, "train", need_both=True)     # train --cache
    val_path = resolve_cache(path, "val")                          # eval --cache
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NoReturn

from spot_fast.cache.manifest import BUILD_STATE, MANIFEST, CacheError

SPLITS = ("train", "val")


def _split_of(folder: Path) -> str | None:
    """The split a single cache folder holds, from its manifest (None if it cannot be read)."""
    try:
        return json.loads((folder / MANIFEST).read_text()).get("split")
    except (OSError, ValueError):
        return None


def resolve_cache(path: str | os.PathLike, split: str = "train", *, need_both: bool = False,
                  cli: bool = True) -> Path:
    """The cache folder of `split` that `path` names (see the module docstring); CacheError otherwise.

    need_both: the caller also reads the other split from the same `path` (train with validation).
    cli: name options as the CLI spells them (`--train-cache`), else as TrainConfig's fields."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    path = Path(path)
    own = {"train": "--train-cache" if cli else "train_cache=", "val": "--val-cache" if cli else "val_cache="}
    opt = "--cache" if cli else "cache="
    if not path.exists():
        raise CacheError(f"no cache at {path}: the folder does not exist (build one with `spot-fast cache DATASET "
                         f"--root ... --split both --out {path}`)")
    if (path / MANIFEST).is_file():
        have = _split_of(path)
        if have == split and not need_both:
            return path
        if have == split:
            return _refuse_single(path, have, own, opt, need_both)
        raise CacheError(f"{opt} {path} is a cache of the {have} split, not of {split}: pass a --split both "
                         f"folder, or give it as {own.get(have, '--train-cache')} {path}")
    parts = {s: path / s for s in SPLITS if (path / s / MANIFEST).is_file()}
    if split in parts:
        if need_both and len(parts) < 2:
            other = next(s for s in SPLITS if s != split)
            raise CacheError(f"{opt} {path} holds no {other} cache ({path / other} is missing): build it "
                             f"(--split {other} --out {path / other}), or pass {own[split]} {parts[split]}")
        return parts[split]
    if parts:
        have = next(iter(parts))
        raise CacheError(f"{opt} {path} holds only a {have} cache ({parts[have]}); {split} is missing: build "
                         f"it with `spot-fast cache ... --split {split} --out {path / split}`")
    if (path / BUILD_STATE).is_file() or any((path / s / BUILD_STATE).is_file() for s in SPLITS):
        raise CacheError(f"{path} is an unfinished cache build: rerun the same `spot-fast cache ...` command "
                         f"to finish it")
    raise CacheError(f"{path} is not a spot-fast cache: it has neither {MANIFEST} nor train/ and val/ caches "
                     f"(build one with `spot-fast cache DATASET --root ... --split both --out {path}`)")


def _refuse_single(path: Path, have: str, own: dict, opt: str, need_both: bool) -> NoReturn:
    other = "val" if have == "train" else "train"
    raise CacheError(f"{opt} {path} is a {have} cache on its own, and {opt} wants a --split both folder "
                     f"({have}/ and {other}/ inside): pass it as {own[have]} {path}"
                     + (f" (and a {other} cache as {own[other]})" if need_both else ""))
