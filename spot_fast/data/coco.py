"""COCO 2017 (and the synthetic COCO-format dataset) as a `Source`.

Layout: `root/annotations/instances_{split}2017.json`, images in `root/{split}2017/` or
`root/images/{split}2017/`. Images are taken in the order of pycocotools' `COCO(...).imgs`.

Training views (2 per image): resize shorter side to S (bilinear), centre crop S, ImageNet
normalise; view 0 is that crop, view 1 its horizontal flip. These are the only two inputs the
reference's Resize -> CenterCrop -> RandomHorizontalFlip(0.5) pipeline can produce.

Validation masks follow the reference's COCO2017 dataset exactly (`coco_masks`): annotations in
file order, numbered from 1 (skipped categories keep their number); the first annotation to
cover a pixel sets its class and instance; pixels covered by more than one annotation are
ignored. One extension: compressed RLE (string `counts`) is decoded directly, where the
reference's `frPyObjects` call would fail; real COCO files use polygons and uncompressed RLE.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from spot_fast.data.base import BadImage, DatasetError, ValSample
from spot_fast.data.sources import check_sizes, require_file, resolve_split
from spot_fast.data.transforms import (center_flip_spec, encode_jpeg, flip_pair, load_rgb,
                                       mask_resize_center_crop, resize_center_crop, to_input)

# COCO category id of each of the reference's 81 classes (index 0 = background).
CAT_LIST = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24,
            25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50,
            51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76,
            77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90)
CLASS_INDEX = {cat: c for c, cat in enumerate(CAT_LIST)}

_FIX = {
    "coco": "Download COCO 2017 (train2017/val2017 images and annotations_trainval2017.zip) "
            "and pass the folder that holds annotations/ as the root.",
    "synthetic": "Write the dataset first: spot-fast data synthetic --out ROOT",
}


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 0/1 mask of one COCO segmentation (polygons, RLE or compressed RLE)."""
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
        return mask_utils.decode(segmentation)  # compressed RLE: already in pycocotools' form
    m = mask_utils.decode(mask_utils.frPyObjects(segmentation, height, width))
    if m.ndim == 3:  # one channel per polygon: their union
        m = (m.sum(axis=2) > 0).astype(np.uint8)
    return m


def coco_masks(annotations: list[dict], height: int, width: int) -> tuple[np.ndarray, ...]:
    """(class, instance, ignore) masks, each (H, W) uint8, as the reference builds them."""
    class_mask = np.zeros((height, width), dtype=np.uint8)
    instance_mask = np.zeros((height, width), dtype=np.uint8)
    counter = np.zeros((height, width), dtype=np.uint8)
    for i, ann in enumerate(annotations, 1):
        m = decode_segmentation(ann["segmentation"], height, width)
        c = CLASS_INDEX.get(ann["category_id"])
        if c is None:
            continue  # category outside the 81 classes; `i` still advances
        hit = m.astype(bool)
        class_mask[hit & (class_mask == 0)] = c
        instance_mask[hit & (instance_mask == 0)] = i % 256  # uint8, as the reference's arrays
        counter += m
    return class_mask, instance_mask, (counter > 1).astype(np.uint8)


def load_coco_index(ann_file: Path) -> COCO:
    """pycocotools' index of `ann_file` (its progress prints silenced); bad JSON -> DatasetError."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(ann_file))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise DatasetError(f"{ann_file}: not a COCO annotation file ({err}). "
                           "Re-download or regenerate it.") from err


class CocoSource:
    """One split of COCO 2017, or of a synthetic COCO-format dataset (`name="synthetic"`)."""

    def __init__(self, root: str | Path, split: str = "train", image_size: int = 224,
                 mask_size: int = 320, name: str = "coco"):
        check_sizes(image_size, mask_size)
        self.name = name
        self.root = Path(root)
        self.split = resolve_split(split, {"train": "train", "val": "val"}, name)
        self.image_size = image_size
        self.mask_size = mask_size
        fix = _FIX.get(name, _FIX["coco"])
        ann_file = self.root / "annotations" / f"instances_{self.split}2017.json"
        self.image_dir = self._find_image_dir(fix)
        self.coco = load_coco_index(require_file(ann_file, f"{name} annotation file", fix))
        self.ids = list(self.coco.imgs.keys())

    def _find_image_dir(self, fix: str) -> Path:
        candidates = [self.root / f"{self.split}2017", self.root / "images" / f"{self.split}2017"]
        for path in candidates:
            if path.is_dir():
                return path
        raise DatasetError(f"{self.name} image folder not found: tried {candidates[0]} and "
                           f"{candidates[1]}. {fix}")

    def __len__(self) -> int:
        return len(self.ids)

    def image_id(self, index: int) -> int:
        return self.ids[index]

    @property
    def num_views(self) -> int:
        return 2

    def views_spec(self) -> dict:
        return center_flip_spec(self.name, self.split, self.image_size)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.coco.imgs[self.ids[index]]["file_name"]

    def train_views(self, index: int) -> torch.Tensor:
        """(2, 3, S, S): the centre crop and its horizontal flip."""
        img = load_rgb(self.image_path(index))
        return flip_pair(resize_center_crop(img, self.image_size))

    def val_sample(self, index: int) -> ValSample:
        path = self.image_path(index)
        crop = resize_center_crop(load_rgb(path), self.image_size)
        meta = self.coco.imgs[self.ids[index]]
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=self.ids[index]))
        try:
            masks = coco_masks(anns, meta["height"], meta["width"])
        except (IndexError, TypeError, ValueError) as err:
            raise BadImage(path, f"cannot decode its annotations: {err}") from err
        class_mask, instance_mask, ignore_mask = (
            mask_resize_center_crop(Image.fromarray(m), self.mask_size) for m in masks)
        return ValSample(image=to_input(crop), jpeg=encode_jpeg(crop),
                         instance_mask=torch.from_numpy(instance_mask).long(),
                         class_mask=torch.from_numpy(class_mask).long(),
                         ignore_mask=torch.from_numpy(ignore_mask))
