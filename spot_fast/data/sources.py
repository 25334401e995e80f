"""Open a dataset split by name, and the small checks every source shares.

    src = open_source("coco", "/data/coco", "val")         # a `Source` (see base.py)
    src = open_source("voc", "/data/VOCdevkit/VOC2012", "train", num_crops=4, seed=0)

Names: coco, voc, movi, folder, synthetic (a COCO-format folder written by
`spot-fast data synthetic`). Extra keyword options go to the source's constructor.
"""
from __future__ import annotations

import inspect
from pathlib import Path

from spot_fast.data.base import DatasetError, Source

SOURCE_NAMES = ("coco", "voc", "movi", "folder", "synthetic")


def open_source(name: str, root: str | Path, split: str, image_size: int = 224,
                mask_size: int = 320, **options) -> Source:
    """The `split` ("train" | "val") of dataset `name` stored under `root`."""
    classes = _source_classes()
    if name not in classes:
        raise DatasetError(f"unknown dataset {name!r}: choose one of {', '.join(SOURCE_NAMES)}")
    cls = classes[name]
    accepted = set(inspect.signature(cls).parameters) - {"root", "split", "image_size", "mask_size", "name"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise DatasetError(f"dataset {name!r} has no option(s) {unknown}: "
                           f"it accepts {sorted(accepted) or 'none'}")
    if name == "synthetic":
        options["name"] = "synthetic"
    return cls(root, split, image_size=image_size, mask_size=mask_size, **options)


def _source_classes() -> dict[str, type]:
    """Name -> class. Imported here, not at the top: the source modules import the helpers below."""
    from spot_fast.data.coco import CocoSource
    from spot_fast.data.folder import FolderSource
    from spot_fast.data.movi import MoviSource
    from spot_fast.data.voc import VocSource
    return {"coco": CocoSource, "voc": VocSource, "movi": MoviSource,
            "folder": FolderSource, "synthetic": CocoSource}


def resolve_split(split: str, native: dict[str, str], dataset: str) -> str:
    """Canonical split ("train" | "val") from either that or the dataset's own name for it.

    `native` maps canonical -> the dataset's name (VOC: {"train": "trainaug", "val": "val"}).
    """
    for canonical, own in native.items():
        if split in (canonical, own):
            return canonical
    names = sorted(set(native) | set(native.values()))
    raise DatasetError(f"{dataset}: unknown split {split!r}; use one of {names}")


def check_sizes(image_size: int, mask_size: int) -> None:
    """Both sizes must be positive integers."""
    for label, value in (("image_size", image_size), ("mask_size", mask_size)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")


def require_file(path: Path, what: str, fix: str) -> Path:
    """`path` if it is a file, else a `DatasetError` naming it and the fix."""
    if not path.is_file():
        raise DatasetError(f"{what} not found: {path}. {fix}")
    return path


def require_dir(path: Path, what: str, fix: str) -> Path:
    """`path` if it is a directory, else a `DatasetError` naming it and the fix."""
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path}. {fix}")
    return path
