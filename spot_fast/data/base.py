"""The contract between datasets and the feature cache.

A `Source` is one split of one dataset. It yields, per image, either the reference's training
views (already transformed exactly as the reference does, ImageNet-normalised) or the reference's
validation sample (centre crop + ground-truth masks at mask size). Unreadable images raise
`BadImage`, which the cache builder catches, skips and lists in the manifest. A dataset that
cannot be read at all, or a bad option, raises `DatasetError` when the source is opened.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from spot_fast.errors import UserError


class BadImage(Exception):
    """An input image that cannot be decoded (corrupt, truncated, not an image)."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class DatasetError(UserError, ValueError):
    """A dataset that cannot be read at all (missing root, split or annotation file, empty folder,
    unreadable ground truth) or a bad option of a source."""


@dataclass
class ValSample:
    image: torch.Tensor          # (3, S, S) float32, normalised: resize shorter side to S, centre crop
    jpeg: bytes                  # the same S x S crop, unnormalised, as JPEG bytes (for pictures)
    instance_mask: torch.Tensor  # (M, M) int64: 0 background, i = i-th instance (NEAREST resize + crop)
    class_mask: torch.Tensor     # (M, M) int64: 0 background, else class index
    ignore_mask: torch.Tensor    # (M, M) uint8: 1 where ground-truth instances overlap


class Source(Protocol):
    name: str        # "coco", "voc", "movi", "folder", "synthetic"
    SPLITS: tuple[str, ...]  # the canonical splits it has ("folder": only "train", no ground truth)
    split: str       # "train" | "val"
    image_size: int  # S
    mask_size: int   # M

    def __len__(self) -> int: ...

    def image_id(self, index: int) -> int | str: ...

    @property
    def num_views(self) -> int:
        """Views stored per training image (COCO: 2 = original + flipped)."""

    def views_spec(self) -> dict:
        """JSON-able description of how the views were made (recorded in the manifest)."""

    def train_views(self, index: int) -> torch.Tensor:
        """(V, 3, S, S) float32, normalised, exactly the reference's training inputs."""

    def val_sample(self, index: int) -> ValSample: ...

    @classmethod
    def content_paths(cls, root: Path, split: str) -> list[Path]:
        """The files and folders whose contents make up `split` (keyed into the cache's identity)."""


# --- checks every source shares ----------------------------------------------------------------

def resolve_split(split: str, native: dict[str, str], dataset: str) -> str:
    """Canonical split ("train" | "val") from either that or the dataset's own name for it.

    `native` maps canonical -> the dataset's name (VOC: {"train": "trainaug", "val": "val"}).
    """
    for canonical, own in native.items():
        if split in (canonical, own):
            return canonical
    names = sorted(set(native) | set(native.values()))
    raise DatasetError(f"{dataset}: unknown split {split!r}; use one of {names}")


def check_int(label: str, value, minimum: int) -> None:
    """`value` must be an integer >= `minimum`; else a `DatasetError` naming `label` and the range."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DatasetError(f"{label} must be an integer >= {minimum}, got {value!r}")


def check_sizes(image_size: int, mask_size: int) -> None:
    """Both sizes must be positive integers."""
    check_int("image_size", image_size, 1)
    check_int("mask_size", mask_size, 1)


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
