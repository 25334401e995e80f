"""The contract between datasets and the feature cache.

A `Source` is one split of one dataset. It yields, per image, either the reference's training
views (already transformed exactly as the reference does, ImageNet-normalised) or the reference's
validation sample (centre crop + ground-truth masks at mask size). Unreadable images raise
`BadImage`, which the cache builder catches, skips and lists in the manifest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class BadImage(Exception):
    """An input image that cannot be decoded (corrupt, truncated, not an image)."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class DatasetError(Exception):
    """A dataset that cannot be read at all (missing root, split or annotation file, empty folder)."""


@dataclass
class ValSample:
    image: torch.Tensor          # (3, S, S) float32, normalised: resize shorter side to S, centre crop
    jpeg: bytes                  # the same S x S crop, unnormalised, as JPEG bytes (for pictures)
    instance_mask: torch.Tensor  # (M, M) int64: 0 background, i = i-th instance (NEAREST resize + crop)
    class_mask: torch.Tensor     # (M, M) int64: 0 background, else class index
    ignore_mask: torch.Tensor    # (M, M) uint8: 1 where ground-truth instances overlap


class Source(Protocol):
    name: str        # "coco", "voc", "movi", "folder", "synthetic"
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
