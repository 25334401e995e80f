"""Open a dataset split by name.

    src = open_source("coco", "/data/coco", "val")         # a `Source` (see base.py)
    src = open_source("voc", "/data/VOCdevkit/VOC2012", "train", num_crops=4, seed=0)

Names: coco, voc, movi, folder, synthetic (a COCO-format folder written by
`spot-fast data synthetic`). Extra keyword options go to the source's constructor.
"""
from __future__ import annotations

import inspect
from pathlib import Path

from spot_fast.data.base import BadImage, DatasetError, Source
from spot_fast.data.coco import CocoSource
from spot_fast.data.folder import FolderSource
from spot_fast.data.movi import MoviSource
from spot_fast.data.voc import VocSource

SOURCES: dict[str, type] = {"coco": CocoSource, "voc": VocSource, "movi": MoviSource,
                            "folder": FolderSource, "synthetic": CocoSource}
SOURCE_NAMES = tuple(SOURCES)
_COMMON = {"root", "split", "image_size", "mask_size", "name"}   # parameters every source takes


def source_options(name: str) -> dict[str, object]:
    """The extra keyword options of dataset `name` with their defaults (the CLI's -o KEY=VALUE)."""
    params = inspect.signature(SOURCES[name]).parameters
    return {k: p.default for k, p in params.items() if k not in _COMMON}


def open_source(name: str, root: str | Path, split: str, image_size: int = 224,
                mask_size: int = 320, **options) -> Source:
    """The `split` ("train" | "val") of dataset `name` stored under `root`."""
    if name not in SOURCES:
        raise DatasetError(f"unknown dataset {name!r}: choose one of {', '.join(SOURCE_NAMES)}")
    cls = SOURCES[name]
    accepted = set(source_options(name))
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise DatasetError(f"dataset {name!r} has no option(s) {unknown}: "
                           f"it accepts {sorted(accepted) or 'none'}")
    if name == "synthetic":
        options["name"] = "synthetic"
    return cls(root, split, image_size=image_size, mask_size=mask_size, **options)


def check_readable(source: Source, samples: int = 8) -> None:
    """Decode up to `samples` images spread over `source`; a `DatasetError` when none of them can
    be read (a folder of non-images, the wrong root), so that nothing empty is cached."""
    n, k = len(source), min(samples, len(source))
    picks = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})     # spread evenly
    reasons = []
    for i in picks:
        try:
            source.train_views(i) if source.split == "train" else source.val_sample(i)
            return
        except BadImage as bad:
            reasons.append(bad)
    if reasons:
        raise DatasetError(f"none of {len(picks)} images sampled from {source.name} {source.split} ({n} files) "
                           f"can be decoded, e.g. {reasons[0]}. Check --root: it should hold the images.")
