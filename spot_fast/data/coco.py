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
An image whose file size differs from its entry's height and width is a `BadImage` (skipped and
listed by the cache build): its masks, drawn at the entry's size, would not line up with it.

Opening a val split checks every annotation first (a category and a mask pycocotools can decode
safely) and refuses a broken one with a `DatasetError` naming the file and the annotation id; a
val split without any object is opened with a loud entry in `warnings`.
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

from spot_fast.data.base import (BadImage, DatasetError, ValSample,
                                    check_sizes, require_file, resolve_split)
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
    """pycocotools' index of `ann_file` (its progress prints silenced); a file it cannot index
    (bad JSON, a list, entries without their keys: it asserts and raises KeyError) -> DatasetError."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(ann_file))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError,
            AssertionError) as err:
        reason = f"an entry has no {err} key" if isinstance(err, KeyError) else str(err)
        raise DatasetError(f"{ann_file}: not a COCO annotation file ({reason}). "
                           "Re-download or regenerate it.") from None
    images = coco.dataset.get("images")
    if not isinstance(images, list) or not images:
        found = "has no 'images' list" if images is None else "lists no images" if isinstance(images, list) \
            else "has an 'images' entry that is not a list"
        raise DatasetError(f"{ann_file} {found}: a COCO annotation file names every image (id, file_name, "
                           "height, width) under 'images'. Use the original file, or add them.")
    return coco


def rle_string_counts(counts: str | bytes) -> list[int] | None:
    """The run lengths of a compressed COCO RLE string (pycocotools' 6-bit LEB128-style code with
    deltas from the count two places back); None when the string is cut off or not ASCII."""
    text = counts.decode("ascii", "replace") if isinstance(counts, bytes) else counts
    out, p = [], 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            if p >= len(text):
                return None
            c = ord(text[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        out.append(x + out[-2] if len(out) > 2 else x)
    return out


def segmentation_problem(segmentation, height: int, width: int) -> str | None:
    """Why `segmentation` is not a mask of a height x width image that pycocotools can decode
    safely (its C decoder does not check run lengths); None when it is one."""
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if list(size or []) != [height, width]:
            return f"RLE size {size} differs from the image's [height, width] = [{height}, {width}]"
        if isinstance(counts, (str, bytes)):
            counts = rle_string_counts(counts)
        ok = isinstance(counts, list) and all(isinstance(c, int) and c >= 0 for c in counts)
        if not ok or sum(counts) != height * width:
            return f"RLE counts are not non-negative run lengths summing to {height} * {width} pixels"
        return None
    try:
        mask_utils.frPyObjects(segmentation, height, width)
    except Exception as err:    # pycocotools raises bare Exception, IndexError, TypeError, ValueError
        return (f"polygons pycocotools cannot read ({err or type(err).__name__}): "
                "expected [[x1, y1, x2, y2, ...]]")
    return None


def check_images(coco: COCO, ann_file: Path) -> None:
    """Every image entry names its file and its integer height and width; else a `DatasetError`."""
    for image_id, meta in coco.imgs.items():
        if not isinstance(meta.get("file_name"), str) or not all(
                isinstance(meta.get(k), int) and meta[k] > 0 for k in ("height", "width")):
            raise DatasetError(f"{ann_file}: image id {image_id} lacks a 'file_name' or a positive integer "
                               "'height' and 'width'. Fix that entry, or use the original COCO file.")


def check_annotations(coco: COCO, ann_file: Path) -> None:
    """Every annotation has a category and a decodable segmentation; else a `DatasetError`
    naming the file and the annotation ids, raised before anything is cached."""
    bad = []
    for ann in coco.anns.values():
        meta = coco.imgs.get(ann.get("image_id"))
        if meta is None:
            problem = f"image_id {ann.get('image_id')!r} is not in the file's images"
        elif "segmentation" not in ann:
            problem = "no 'segmentation' (a detection-only file has no masks to evaluate against)"
        elif not isinstance(ann.get("category_id"), int):
            problem = "no integer 'category_id'"
        else:
            problem = segmentation_problem(ann["segmentation"], meta["height"], meta["width"])
        if problem is not None:
            bad.append((ann.get("id"), problem))
    if bad:
        (ann_id, problem), more = bad[0], len(bad) - 1
        raise DatasetError(f"{ann_file}: annotation id {ann_id}: {problem}"
                           + (f" (and {more} more bad annotations)" if more else "")
                           + ". Fix or remove those annotations, or use the original COCO file.")


def ground_truth_warnings(coco: COCO, ann_file: Path) -> list[str]:
    """A loud note when a validation split has no ground-truth objects at all."""
    if any(coco.imgToAnns.get(i) for i in coco.imgs):
        return []
    return [f"{ann_file} has no object annotations for its {len(coco.imgs)} images: the validation "
            "cache will hold empty ground truth and every metric on it is meaningless"]


def find_image_dir(root: Path, split: str) -> Path | None:
    """`root/{split}2017`, else `root/images/{split}2017`, whichever is a folder (None: neither)."""
    for path in (root / f"{split}2017", root / "images" / f"{split}2017"):
        if path.is_dir():
            return path
    return None


class CocoSource:
    """One split of COCO 2017, or of a synthetic COCO-format dataset (`name="synthetic"`)."""

    SPLITS = ("train", "val")

    def __init__(self, root: str | Path, split: str = "train", image_size: int = 224,
                 mask_size: int = 320, name: str = "coco"):
        check_sizes(image_size, mask_size)
        self.name = name
        self.root = Path(root)
        self.split = resolve_split(split, {"train": "train", "val": "val"}, name)
        self.image_size = image_size
        self.mask_size = mask_size
        fix = _FIX.get(name, _FIX["coco"])
        self.ann_file = self.root / "annotations" / f"instances_{self.split}2017.json"
        self.image_dir = find_image_dir(self.root, self.split)
        if self.image_dir is None:
            raise DatasetError(f"{name} image folder not found: tried {self.root / f'{self.split}2017'} and "
                               f"{self.root / 'images' / f'{self.split}2017'}. {fix}")
        self.coco = load_coco_index(require_file(self.ann_file, f"{name} annotation file", fix))
        self.ids = list(self.coco.imgs.keys())
        check_images(self.coco, self.ann_file)
        self.warnings: list[str] = []
        if self.split == "val":
            check_annotations(self.coco, self.ann_file)
            self.warnings += ground_truth_warnings(self.coco, self.ann_file)

    @classmethod
    def content_paths(cls, root: Path, split: str) -> list[Path]:
        root = Path(root)
        image_dir = find_image_dir(root, split) or root / f"{split}2017"
        return [root / "annotations" / f"instances_{split}2017.json", image_dir]

    def __len__(self) -> int:
        return len(self.ids)

    def image_id(self, index: int) -> int:
        return self.ids[index]

    @property
    def num_views(self) -> int:
        return 2

    def views_spec(self) -> dict:
        spec = center_flip_spec(self.name, self.split, self.image_size)
        if self.split == "val":
            with_objects = sum(1 for i in self.ids if self.coco.imgToAnns.get(i))
            spec["ground_truth"] = {"annotations": len(self.coco.anns), "images_with_objects": with_objects,
                                    "images": len(self.ids)}
        return spec

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.coco.imgs[self.ids[index]]["file_name"]

    def train_views(self, index: int) -> torch.Tensor:
        """(2, 3, S, S): the centre crop and its horizontal flip."""
        img = load_rgb(self.image_path(index))
        return flip_pair(resize_center_crop(img, self.image_size))

    def val_sample(self, index: int) -> ValSample:
        path = self.image_path(index)
        image = load_rgb(path)
        meta = self.coco.imgs[self.ids[index]]
        if image.size != (meta["width"], meta["height"]):   # masks are drawn at the annotated size
            raise BadImage(path, f"the file is {image.height}x{image.width} (height x width) but {self.ann_file} "
                           f"says {meta['height']}x{meta['width']}: its masks would not line up with it. "
                           "Fix that image entry's height and width, or use the original image")
        crop = resize_center_crop(image, self.image_size)
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=self.ids[index]))
        try:
            masks = coco_masks(anns, meta["height"], meta["width"])
        except (IndexError, KeyError, TypeError, ValueError) as err:
            ids = [a.get("id") for a in anns]
            raise BadImage(path, f"cannot decode its annotations {ids} in {self.ann_file}: {err}") from err
        class_mask, instance_mask, ignore_mask = (
            mask_resize_center_crop(Image.fromarray(m), self.mask_size) for m in masks)
        return ValSample(image=to_input(crop), jpeg=encode_jpeg(crop),
                         instance_mask=torch.from_numpy(instance_mask).long(),
                         class_mask=torch.from_numpy(class_mask).long(),
                         ignore_mask=torch.from_numpy(ignore_mask))
