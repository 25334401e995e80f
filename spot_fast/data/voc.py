"""PASCAL VOC 2012 (segmentation, with the SBD "trainaug" list) as a `Source`.

Layout: `root/ImageSets/Segmentation/{trainaug,val}.txt`, `root/JPEGImages/<name>.jpg`,
`root/SegmentationClass/<name>.png`, `root/SegmentationObject/<name>.png` (palette PNGs).

Training: the reference draws a fresh random crop (after resizing the shorter side to S) and a
random flip every epoch. A cache holds a finite sample of that distribution: `num_crops` crop
offsets per image, each drawn uniformly like torchvision's RandomCrop from a generator seeded by
(seed, image index), each stored unflipped and flipped. Views are ordered
[crop 0, crop 0 flipped, crop 1, crop 1 flipped, ...].

Validation: centre crop; masks NEAREST-resized and centre-cropped, 255 (object boundaries) -> 0
in both masks; no overlaps, so the ignore mask is all zeros.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from spot_fast.data.base import (BadImage, ValSample, check_int, check_sizes,
                                    require_dir, require_file, resolve_split)
from spot_fast.data.transforms import (center_flip_spec, crop, encode_jpeg, hflip, load_image, load_rgb,
                                       mask_resize_center_crop, resize_center_crop,
                                       resize_shorter, to_input)

_FIX = ("Pass the VOC2012 folder (the one holding JPEGImages/) as the root; the train split "
        "needs ImageSets/Segmentation/trainaug.txt from the SBD augmented set.")


def random_crop_offsets(width: int, height: int, size: int, count: int,
                        seed: int, index: int) -> list[tuple[int, int]]:
    """`count` (left, top) offsets of a `size` crop, uniform over the valid range, reproducible."""
    rng = np.random.default_rng([seed, index])
    tops = rng.integers(0, height - size + 1, size=count)
    lefts = rng.integers(0, width - size + 1, size=count)
    return [(int(left), int(top)) for left, top in zip(lefts, tops)]


class VocSource:
    """One split of PASCAL VOC 2012 ("train" = trainaug, "val")."""

    name = "voc"
    SPLITS = ("train", "val")
    warnings: tuple[str, ...] = ()

    def __init__(self, root: str | Path, split: str = "train", image_size: int = 224,
                 mask_size: int = 320, num_crops: int = 4, seed: int = 0):
        check_sizes(image_size, mask_size)
        check_int("voc option num_crops (crop offsets per training image)", num_crops, 1)
        check_int("voc option seed", seed, 0)
        self.root = Path(root)
        self.split = resolve_split(split, {"train": "trainaug", "val": "val"}, self.name)
        self.image_size, self.mask_size = image_size, mask_size
        self.num_crops, self.seed = num_crops, seed
        list_name = "trainaug" if self.split == "train" else "val"
        list_file = require_file(self.root / "ImageSets" / "Segmentation" / f"{list_name}.txt",
                                 "VOC image list", _FIX)
        require_dir(self.root / "JPEGImages", "VOC image folder", _FIX)
        self.names = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]

    @classmethod
    def content_paths(cls, root: Path, split: str) -> list[Path]:
        root = Path(root)
        canonical = resolve_split(split, {"train": "trainaug", "val": "val"}, cls.name)
        list_name = "trainaug" if canonical == "train" else "val"
        masks = [] if canonical == "train" else [root / "SegmentationClass", root / "SegmentationObject"]
        return [root / "ImageSets" / "Segmentation" / f"{list_name}.txt", root / "JPEGImages", *masks]

    def __len__(self) -> int:
        return len(self.names)

    def image_id(self, index: int) -> str:
        return self.names[index]

    @property
    def num_views(self) -> int:
        return 2 * self.num_crops

    def views_spec(self) -> dict:
        if self.split == "val":
            return center_flip_spec(self.name, self.split, self.image_size)
        return {"source": self.name, "split": self.split, "image_size": self.image_size,
                "num_views": self.num_views, "num_crops": self.num_crops, "seed": self.seed,
                "views": "[crop 0, crop 0 hflip, crop 1, crop 1 hflip, ...]",
                "rule": f"resize shorter side to {self.image_size} (PIL bilinear); crop offsets "
                        "(top, left) = numpy default_rng([seed, index]).integers(0, H - S + 1, "
                        "num_crops), then .integers(0, W - S + 1, num_crops); ImageNet normalise; "
                        "each crop also flipped horizontally"}

    def _path(self, folder: str, index: int, suffix: str) -> Path:
        return self.root / folder / f"{self.names[index]}{suffix}"

    def train_views(self, index: int) -> torch.Tensor:
        """(2 * num_crops, 3, S, S)."""
        img = resize_shorter(load_rgb(self._path("JPEGImages", index, ".jpg")), self.image_size)
        offsets = random_crop_offsets(img.width, img.height, self.image_size, self.num_crops,
                                      self.seed, index)
        views = []
        for left, top in offsets:
            x = to_input(crop(img, left, top, self.image_size))
            views += [x, hflip(x)]
        return torch.stack(views)

    def _mask(self, folder: str, index: int) -> torch.Tensor:
        path = self._path(folder, index, ".png")
        mask = load_image(path, mode=None)  # keep palette indices
        if mask.mode not in ("P", "L"):
            raise BadImage(path, f"mask mode {mask.mode!r}: expected a palette or greyscale PNG")
        out = torch.from_numpy(mask_resize_center_crop(mask, self.mask_size)).long()
        out[out == 255] = 0  # object boundaries
        return out

    def val_sample(self, index: int) -> ValSample:
        crop_img = resize_center_crop(load_rgb(self._path("JPEGImages", index, ".jpg")),
                                      self.image_size)
        return ValSample(image=to_input(crop_img), jpeg=encode_jpeg(crop_img),
                         instance_mask=self._mask("SegmentationObject", index),
                         class_mask=self._mask("SegmentationClass", index),
                         ignore_mask=torch.zeros(self.mask_size, self.mask_size, dtype=torch.uint8))

