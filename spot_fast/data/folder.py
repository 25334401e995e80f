"""Any folder of images (jpg, jpeg, png, webp; searched recursively) as a training `Source`.

Images are sorted by their path relative to the root, which is also their image id. Training
views are COCO's: the centre crop after resizing the shorter side to S, and its flip. There is
no ground truth, so a folder has only a train split: opening "val" raises `DatasetError`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from spot_fast.data.base import DatasetError, ValSample, check_sizes, require_dir, resolve_split
from spot_fast.data.transforms import center_flip_spec, flip_pair, load_rgb, resize_center_crop
from spot_fast.errors import arg

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_NO_VAL = ("{root}: a plain image folder has no ground-truth masks, so it has only a train split "
           "(use {train}). Evaluate on coco, voc, movi or synthetic.")


def list_images(root: Path) -> list[str]:
    """Relative POSIX paths of the image files under `root`, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class FolderSource:
    """Every image under `root`; the split name is only recorded."""

    name = "folder"
    SPLITS = ("train",)
    warnings: tuple[str, ...] = ()

    def __init__(self, root: str | Path, split: str = "train", image_size: int = 224,
                 mask_size: int = 320):
        check_sizes(image_size, mask_size)
        self.root = require_dir(Path(root), "image folder", "Pass an existing folder of images.")
        self.split = resolve_split(split, {"train": "train", "val": "val"}, self.name)
        if self.split not in self.SPLITS:
            raise DatasetError(_NO_VAL.format(root=self.root, train=arg("split", "train")))
        self.image_size, self.mask_size = image_size, mask_size
        self.files = list_images(self.root)
        if not self.files:
            raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}. "
                               "Pass a folder that contains images.")

    @classmethod
    def content_paths(cls, root: Path, split: str) -> list[Path]:
        """The images themselves, not the folder: a cache written inside it is no part of it."""
        return [Path(root) / f for f in list_images(Path(root))] if Path(root).is_dir() else [Path(root)]

    def __len__(self) -> int:
        return len(self.files)

    def image_id(self, index: int) -> str:
        return self.files[index]

    @property
    def num_views(self) -> int:
        return 2

    def views_spec(self) -> dict:
        return center_flip_spec(self.name, self.split, self.image_size)

    def train_views(self, index: int) -> torch.Tensor:
        """(2, 3, S, S): the centre crop and its horizontal flip."""
        img = load_rgb(self.root / self.files[index])
        return flip_pair(resize_center_crop(img, self.image_size))

    def val_sample(self, index: int) -> ValSample:
        raise DatasetError(_NO_VAL.format(root=self.root, train=arg("split", "train")))
