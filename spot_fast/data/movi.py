"""MOVi-C / MOVi-E (Kubric) frames as a `Source`.

Layout: `root/{train,validation}/<clip>/<frame>_image.png`, with ground truth beside each frame:
`<frame>_mask_00.png` ... `<frame>_mask_{num_segs-1:02}.png` (one binary mask per segment).

Training: `frames_per_clip` frames of each clip, picked by shuffling the clip's sorted frame
list with `random.Random(f"{seed}/{clip}")` and keeping the first ones (the reference shuffles
with the global RNG; seeding makes the choice reproducible). One view per frame: resize to S x S
with PIL's default filter for RGB (bicubic), ImageNet normalise - no augmentation.

Validation: every frame. The image as in training (the reference does not centre-crop MOVi);
mask segment n converted to mode "1", resized to M x M (PIL: nearest for mode "1"), and
the instance mask is sum_n n * mask_n; no classes, no overlaps (class and ignore masks zero).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spot_fast.data.base import (DatasetError, ValSample, check_int, check_sizes, require_dir,
                                    resolve_split)
from spot_fast.data.transforms import encode_jpeg, load_image, load_rgb, to_input

_FIX = "Pass the MOVi folder that holds train/ and validation/ (one sub-folder per clip)."
_IMAGE_SUFFIX = "_image.png"


def pick_frames(frames: list[Path], count: int, seed: int, clip: str) -> list[Path]:
    """`count` frames of one clip, chosen by a shuffle seeded by (seed, clip name), kept sorted."""
    order = sorted(frames)
    random.Random(f"{seed}/{clip}").shuffle(order)
    return sorted(order[:count])


class MoviSource:
    """One split of a MOVi dataset ("train", "val" = validation/)."""

    name = "movi"
    SPLITS = ("train", "val")
    warnings: tuple[str, ...] = ()

    def __init__(self, root: str | Path, split: str = "train", image_size: int = 224,
                 mask_size: int = 320, frames_per_clip: int = 9, seed: int = 0,
                 num_segs: int = 25):
        check_sizes(image_size, mask_size)
        check_int("movi option frames_per_clip", frames_per_clip, 1)
        check_int("movi option seed", seed, 0)
        check_int("movi option num_segs (mask files per frame)", num_segs, 1)
        self.root = Path(root)
        self.split = resolve_split(split, {"train": "train", "val": "validation"}, self.name)
        self.image_size, self.mask_size = image_size, mask_size
        self.frames_per_clip, self.seed, self.num_segs = frames_per_clip, seed, num_segs
        split_dir = require_dir(self.root / ("train" if self.split == "train" else "validation"),
                                "MOVi split folder", _FIX)
        self.frames = self._list_frames(split_dir)
        if not self.frames:
            raise DatasetError(f"no *{_IMAGE_SUFFIX} frames under {split_dir}. {_FIX}")

    @classmethod
    def content_paths(cls, root: Path, split: str) -> list[Path]:
        canonical = resolve_split(split, {"train": "train", "val": "validation"}, cls.name)
        return [Path(root) / ("train" if canonical == "train" else "validation")]

    def _list_frames(self, split_dir: Path) -> list[Path]:
        frames = []
        for clip in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            paths = list(clip.glob(f"*{_IMAGE_SUFFIX}"))
            if self.split == "train":
                paths = pick_frames(paths, self.frames_per_clip, self.seed, clip.name)
            frames += sorted(paths)
        return frames

    def __len__(self) -> int:
        return len(self.frames)

    def image_id(self, index: int) -> str:
        path = self.frames[index]
        return f"{path.parent.name}/{path.name[:-len(_IMAGE_SUFFIX)]}"

    @property
    def num_views(self) -> int:
        return 1

    def views_spec(self) -> dict:
        return {"source": self.name, "split": self.split, "image_size": self.image_size,
                "num_views": 1, "seed": self.seed, "frames_per_clip": self.frames_per_clip,
                "views": ["original"],
                "rule": f"resize to {self.image_size}x{self.image_size} (PIL bicubic, the "
                        "reference's Image.resize default), ImageNet normalise; train frames: "
                        "random.Random(f'{seed}/{clip}').shuffle(sorted frames)[:frames_per_clip]"}

    def _resized(self, index: int) -> Image.Image:
        size = (self.image_size, self.image_size)
        return load_rgb(self.frames[index]).resize(size, Image.Resampling.BICUBIC)

    def train_views(self, index: int) -> torch.Tensor:
        """(1, 3, S, S)."""
        return to_input(self._resized(index)).unsqueeze(0)

    def _instance_mask(self, index: int) -> torch.Tensor:
        frame = self.frames[index]
        stem = frame.name[:-len(_IMAGE_SUFFIX)]
        size = (self.mask_size, self.mask_size)
        instance = np.zeros(size, dtype=np.int64)
        for n in range(self.num_segs):
            seg = load_image(frame.parent / f"{stem}_mask_{n:02}.png", mode="1")
            instance += np.asarray(seg.resize(size, Image.Resampling.NEAREST), dtype=np.int64) * n
        return torch.from_numpy(instance)

    def val_sample(self, index: int) -> ValSample:
        img = self._resized(index)
        zeros = torch.zeros(self.mask_size, self.mask_size, dtype=torch.int64)
        return ValSample(image=to_input(img), jpeg=encode_jpeg(img),
                         instance_mask=self._instance_mask(index), class_mask=zeros,
                         ignore_mask=zeros.to(torch.uint8))
