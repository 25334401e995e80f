"""The reference's input pipeline: a COCO-format dataset on disk, read as its `COCO2017` dataset
reads it, through `DataLoader(num_workers=4, pin_memory=True)`.

Per image (train and val alike) the reference opens the JPEG, converts it to RGB AND decodes
every annotation's mask (pycocotools) into class / instance / overlap masks, before its
transforms: train, resize + centre crop + random flip + normalise (the masks are dropped); val,
the image and the three masks at the mask size. `ReferenceCOCO` does exactly that with
spot-fast's bit-exact transcriptions of those transforms (`spot_fast.data`).

`write_dataset` makes the data: `images` distinct COCO-sized scenes (640x480 or 480x640 JPEGs,
~7 polygon annotations each, as COCO has) listed `entries` times over in the annotation files of
both splits (a loader never runs dry while it is timed; the files stay in the page cache as
COCO's hot set would), plus a `cache/` root listing `cache_entries` (default: each image once), for spot-fast's caches.
"""
from __future__ import annotations

import json
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pycocotools import mask as mask_utils

from spot_fast.data.coco import CLASS_INDEX, load_coco_index
from spot_fast.data.synthetic import CATEGORIES, SyntheticConfig, render_scene
from spot_fast.data.transforms import hflip, mask_resize_center_crop, resize_center_crop, to_input

LOADER_WORKERS = 4      # the reference's --num_workers default


def write_dataset(root: str | Path, images: int, entries: int, short_side: int = 480, seed: int = 0,
                  cache_entries: int | None = None) -> Path:
    """Write the bench's COCO-format data under `root` (see the module docstring); returns root."""
    root = Path(root)
    pictures = root / "images"
    pictures.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    config = SyntheticConfig(image_size=short_side, min_objects=5, max_objects=9)
    metas, anns = [], []
    for k in range(images):
        width, height = (short_side * 4 // 3, short_side) if k % 2 == 0 else (short_side, short_side * 4 // 3)
        pixels, objects = render_scene(rng, width, height, int(rng.integers(5, 10)), k % 3 == 0, config)
        name = f"{k:012d}.jpg"
        Image.fromarray(pixels).save(pictures / name, quality=90)
        metas.append({"file_name": name, "width": width, "height": height})
        anns.append([{"category_id": o.category_id, "iscrowd": 0, "area": float(o.mask.sum()),
                      "segmentation": [[round(v, 2) for p in o.polygon for v in p]]} for o in objects])
    for folder, count in ((root, entries), (root / "cache", cache_entries or images)):
        _annotations(folder, metas, anns, count, pictures)
    return root


def make_jpegs(count: int, short_side: int = 480, seed: int = 0) -> list[bytes]:
    """`count` COCO-sized JPEGs (the scenes of `write_dataset`) as bytes, for timing decodes."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(tmp, count, count, short_side, seed)
        return [p.read_bytes() for p in sorted((Path(tmp) / "images").iterdir())]


def _annotations(folder: Path, metas: list[dict], anns: list[list[dict]], count: int, pictures: Path) -> None:
    """Annotation files of both splits listing `count` entries that cycle through the images."""
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        images.append({"id": i + 1, **metas[i % len(metas)]})
        for a in anns[i % len(metas)]:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "bbox": [0, 0, 1, 1], **a})
    coco = {"images": images, "annotations": annotations, "categories": list(CATEGORIES)}
    for split in ("train", "val"):
        (folder / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco))
        link = folder / f"{split}2017"
        if not link.exists():
            link.symlink_to(pictures.resolve(), target_is_directory=True)


def masks(anns: list[dict], h: int, w: int) -> np.ndarray:
    """(3, H, W) uint8 class, instance and overlap masks, with the reference's array arithmetic
    (`COCO2017._gen_seg_n_insta_masks`: a polygon list decodes to (H, W, n) and is reduced with
    `np.sum(.., axis=2) > 0` for each of the three masks). The same masks as
    `spot_fast.data.coco.coco_masks`, at the reference's cost."""
    seg, inst, ignore = (np.zeros((h, w), dtype=np.uint8) for _ in range(3))
    for i, ann in enumerate(anns, 1):
        m = mask_utils.decode(mask_utils.frPyObjects(ann["segmentation"], h, w))
        c = CLASS_INDEX.get(ann["category_id"])
        if c is None:
            continue
        if len(m.shape) < 3:
            seg[:, :] += (seg == 0) * (m * c)
            inst[:, :] += (inst == 0) * (m * i)
            ignore[:, :] += m
        else:
            seg[:, :] += (seg == 0) * (((np.sum(m, axis=2)) > 0) * c).astype(np.uint8)
            inst[:, :] += (inst == 0) * (((np.sum(m, axis=2)) > 0) * i).astype(np.uint8)
            ignore[:, :] += (((np.sum(m, axis=2)) > 0) * 1).astype(np.uint8)
    return np.stack([seg, inst, (ignore > 1).astype(np.uint8)])


class ReferenceCOCO(Dataset):
    """The reference's `COCO2017(root, split, image_size, mask_size)`."""

    def __init__(self, root: str | Path, split: str, image_size: int, mask_size: int):
        self.root, self.split, self.image_size, self.mask_size = Path(root), split, image_size, mask_size
        self.coco = load_coco_index(self.root / "annotations" / f"instances_{split}2017.json")
        self.ids = list(self.coco.imgs.keys())

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        meta = self.coco.loadImgs(self.ids[index])[0]
        img = Image.open(self.root / f"{self.split}2017" / meta["file_name"]).convert("RGB")
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=self.ids[index]))
        class_mask, instance_mask, ignore = (Image.fromarray(m) for m in masks(anns, meta["height"], meta["width"]))
        if self.split == "train":
            crop = resize_center_crop(img, self.image_size)
            x = to_input(crop)
            return hflip(x) if random.random() < 0.5 else x
        x = to_input(resize_center_crop(img, self.image_size))
        instance, cls, ignore = (torch.from_numpy(mask_resize_center_crop(m, self.mask_size)).long()
                                 for m in (instance_mask, class_mask, ignore))
        return x, instance, cls, ignore.unsqueeze(0)


def reference_loader(dataset: Dataset, batch: int, train: bool, workers: int = LOADER_WORKERS) -> DataLoader:
    """The reference's loaders: train shuffled with drop_last, val in order; 4 workers, pinned."""
    warnings.filterwarnings("ignore", message=".*pin_memory.*")     # pinning is a no-op without CUDA
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 4 workers on fewer cores: as the reference
    return DataLoader(dataset, shuffle=train, drop_last=train, batch_size=batch, num_workers=workers,
                      pin_memory=True)


class Batches:
    """One iterator over a loader, restarted at its end (the bench sizes the data so it never is
    while timing). It starts with the loader's first prefetch done (`settle`): a long run pays
    that fill once, not in the few steps a bench times."""

    def __init__(self, loader: DataLoader):
        self.loader, self.it = loader, iter(loader)
        self.settle()

    def settle(self, timeout_s: float = 120.0) -> None:
        """Wait until the workers have delivered every batch they were first asked for."""
        queue = getattr(self.it, "_data_queue", None)
        wanted = getattr(self.it, "_tasks_outstanding", 0)
        end = time.monotonic() + timeout_s
        try:
            while queue is not None and queue.qsize() < wanted and time.monotonic() < end:
                time.sleep(0.05)
        except NotImplementedError:         # no qsize on this platform: no wait
            pass

    def next(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)
