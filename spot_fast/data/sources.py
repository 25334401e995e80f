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
from spot_fast.errors import arg

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
                           f"can be decoded, e.g. {reasons[0]}. Check {arg('root')}: it should hold the images.")


class ReadableSource:
    """The training images of `source` that decode, for training on images without a cache: the
    others are left out and listed in `skipped` (path, reason), as a cache build skips and lists
    them. Every image is decoded once here (less than one epoch's work) so that the sampler sees
    a fixed set of indices from the first step."""

    def __init__(self, source: Source):
        self.source, self.keep, self.skipped = source, [], []
        for i in range(len(source)):
            try:
                source.train_views(i)
                self.keep.append(i)
            except BadImage as bad:
                self.skipped.append({"index": i, "path": bad.path, "reason": bad.reason})
        if not self.keep:
            raise DatasetError(f"none of the {len(source)} images of {source.name} {source.split} can be decoded, "
                               f"e.g. {self.skipped[0]['path']}: {self.skipped[0]['reason']}. Check the images root.")
        self.name, self.split, self.SPLITS = source.name, source.split, source.SPLITS
        self.image_size, self.mask_size, self.num_views = source.image_size, source.mask_size, source.num_views

    def __len__(self) -> int:
        return len(self.keep)

    def image_id(self, index: int):
        return self.source.image_id(self.keep[index])

    def views_spec(self) -> dict:
        return self.source.views_spec()

    def train_views(self, index: int):
        return self.source.train_views(self.keep[index])

    def summary(self, shown: int = 3) -> str:
        """One line naming the skipped images ("" when none was)."""
        if not self.skipped:
            return ""
        names = ", ".join(f"{s['path']} ({s['reason']})" for s in self.skipped[:shown])
        more = f" and {len(self.skipped) - shown} more" if len(self.skipped) > shown else ""
        return f"skipped {len(self.skipped)} of {len(self.source)} images that cannot be decoded: {names}{more}"
