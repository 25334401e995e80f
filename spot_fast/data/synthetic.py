"""A small procedural multi-object dataset in COCO format, for tests and the demo.

    write_synthetic(Path("/tmp/synth"), SyntheticConfig(num_train=64, num_val=16))

writes `train2017/*.jpg`, `val2017/*.jpg` and `annotations/instances_{train,val}2017.json`, so
`open_source("synthetic", root, split)` (the COCO reader) can use it. Each scene has 2-5 textured
shapes (5 categories, COCO ids 1-5) on a gradient, noise or striped background; the first image
of each split and about half of the others have an object placed to overlap another. Images are
landscape or portrait (shorter side `image_size`, longer side 4/3 of it). Annotations are the
whole (amodal) shape, so overlaps show up in the ignore mask; their segmentation format cycles
through polygon, compressed RLE (string counts) and uncompressed RLE (list counts). Everything is
a pure function of the seed.

The scenes' difficulty has knobs (object textures, backgrounds, object size, pixel noise) and
named levels in `LEVELS`: "mixed" (the defaults above), "easy" (large flat-coloured shapes on
a flat background: what a random-init encoder and a few CPU minutes of training can segment) and
"spaced" (3-4 such shapes in square images, their centres spread out: `spot-fast demo`'s; the
shapes still touch and partly overlap, see LEVELS).
`SyntheticConfig.at_level("spaced", num_train=...)` builds one.
"""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from spot_fast.data.base import DatasetError, check_int
from spot_fast.data.shapes import BACKGROUNDS, TEXTURES, background, rasterise, shape_polygon, texture
from spot_fast.errors import arg

CATEGORIES = ({"id": 1, "name": "circle"}, {"id": 2, "name": "rectangle"},
              {"id": 3, "name": "triangle"}, {"id": 4, "name": "pentagon"},
              {"id": 5, "name": "star"})
SEGMENTATION_FORMATS = ("polygon", "rle", "uncompressed_rle")
_SPLIT_ID_BASE = {"train": 1, "val": 1_000_001}  # distinct image ids across splits


@dataclass
class SyntheticConfig:
    num_train: int = 64      # images in train2017/
    num_val: int = 16        # images in val2017/
    image_size: int = 96     # shorter image side in pixels (the longer side is 4/3 of it)
    seed: int = 0            # everything is a function of this
    min_objects: int = 2     # objects per scene, inclusive range
    max_objects: int = 5
    overlap_prob: float = 0.5  # chance that a scene places its 2nd object over its 1st
    jpeg_quality: int = 95
    # Difficulty knobs (defaults: the "mixed" level).
    textures: tuple[str, ...] = TEXTURES        # object textures drawn from (a subset of TEXTURES)
    backgrounds: tuple[str, ...] = BACKGROUNDS[:3]  # backgrounds drawn from (a subset of BACKGROUNDS)
    min_radius: float = 0.15   # object circumradius range, as a fraction of the shorter side
    max_radius: float = 0.3
    noise_std: float = 4.0     # per-pixel Gaussian noise (0-255 scale) added to the whole image
    square: bool = False       # square images (the centre crop then cuts no object), else 3:4
    min_gap: float = 0.0       # > 0: redraw an object's centre (up to 100 times) until it is at least
                               # min_gap * (r + r') from every placed object's (1.0: circumcircles apart;
                               # below 1 the shapes may still overlap)

    def __post_init__(self):
        self.textures, self.backgrounds = tuple(self.textures), tuple(self.backgrounds)
        for name, chosen, allowed in (("textures", self.textures, TEXTURES),
                                      ("backgrounds", self.backgrounds, BACKGROUNDS)):
            if not chosen or not set(chosen) <= set(allowed):
                raise ValueError(f"{name} must be a non-empty subset of {allowed}, got {chosen}")
        if not 0 < self.min_radius <= self.max_radius < 0.5:
            raise ValueError(f"need 0 < min_radius <= max_radius < 0.5, got {self.min_radius}, {self.max_radius}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if not 0 <= self.min_gap <= 1.5:
            raise ValueError(f"min_gap must be in [0, 1.5], got {self.min_gap}")

    @classmethod
    def at_level(cls, level: str, **fields) -> "SyntheticConfig":
        """The named difficulty `level` (a key of LEVELS), with `fields` overriding it."""
        if level not in LEVELS:
            raise ValueError(f"unknown difficulty level {level!r}: choose one of {sorted(LEVELS)}")
        return cls(**{**LEVELS[level], **fields})


# Named difficulty levels: SyntheticConfig fields. "easy": 1-3 large flat-coloured shapes on a flat
# background, no forced overlap, little noise: colour alone tells the objects apart. "spaced" (the
# demo's): 3-4 such shapes in square images, their centres at least 0.7 (r + r') apart, which
# spreads them out but does not keep them apart: later shapes partly cover earlier ones, and the
# (amodal) masks of the demo's seed-0 data overlap in 197 of 200 val images (71% of object pairs;
# 11% of the foreground pixels are covered twice, which the metrics ignore). With several objects
# in every image, a trivial segmentation no longer scores FG-ARI 100 on the one-object images
# "easy" has.
LEVELS: dict[str, dict] = {
    "mixed": {},
    "easy": dict(textures=("flat",), backgrounds=("flat",), min_radius=0.25, max_radius=0.38, noise_std=2.0,
                 min_objects=1, max_objects=3, overlap_prob=0.0),
    "spaced": dict(textures=("flat",), backgrounds=("flat",), min_radius=0.2, max_radius=0.3, noise_std=2.0,
                   min_objects=3, max_objects=4, overlap_prob=0.0, square=True, min_gap=0.7),
}


@dataclass
class SceneObject:
    category_id: int
    polygon: list[tuple[float, float]]  # vertices (x, y) in pixels
    mask: np.ndarray                    # (H, W) bool, the rasterised polygon


# --- scenes -------------------------------------------------------------------------------------

def _centre(rng: np.random.Generator, r: float, width: int, height: int) -> tuple[float, float]:
    return rng.uniform(r + 1, width - r - 1), rng.uniform(r + 1, height - r - 1)


def _spaced_centre(rng: np.random.Generator, r: float, width: int, height: int,
                   placed: list, min_gap: float, tries: int = 100) -> tuple[float, float]:
    """A centre at least min_gap * (r + r') from every placed ((cx, cy), r'); after `tries`
    draws, the draw farthest (relative to that bound) from its nearest neighbour."""
    best, best_room = None, -math.inf
    for _ in range(tries):
        cx, cy = _centre(rng, r, width, height)
        room = min((math.hypot(cx - px, cy - py) / (min_gap * (r + pr)) for (px, py), pr in placed), default=math.inf)
        if room >= 1:
            return cx, cy
        if room > best_room:
            best, best_room = (cx, cy), room
    return best


def render_scene(rng: np.random.Generator, width: int, height: int, num_objects: int,
                 overlap: bool, config: SyntheticConfig | None = None) -> tuple[np.ndarray, list[SceneObject]]:
    """(H, W, 3) uint8 image and its objects, drawn in order (later ones on top).

    With `overlap`, object 1 is no larger than object 0 and its centre is 0.3 (r0 + r1) from
    object 0's, so their discs of radius 0.38 r overlap: the two masks always intersect.
    `config` gives the difficulty knobs (textures, backgrounds, radii, noise; default: "mixed").
    """
    config = config or SyntheticConfig()
    short = min(width, height)
    image = background(rng, height, width, config.backgrounds)
    objects, placed = [], []
    for k in range(num_objects):
        category_id = int(rng.integers(1, len(CATEGORIES) + 1))
        if overlap and k == 1:
            (cx0, cy0), r0 = placed[0]
            r = r0 * rng.uniform(0.6, 1.0)
            phi, d = rng.uniform(0, 2 * math.pi), 0.3 * (r0 + r)
            cx = float(np.clip(cx0 + d * math.cos(phi), r + 1, width - r - 1))
            cy = float(np.clip(cy0 + d * math.sin(phi), r + 1, height - r - 1))
        else:
            r = rng.uniform(config.min_radius, config.max_radius) * short
            if config.min_gap > 0:
                cx, cy = _spaced_centre(rng, r, width, height, placed, config.min_gap)
            else:
                cx, cy = _centre(rng, r, width, height)
        polygon = shape_polygon(category_id, cx, cy, r, rng)
        mask = rasterise(polygon, width, height)
        image[mask] = texture(rng, height, width, config.textures)[mask]
        placed.append(((cx, cy), r))
        objects.append(SceneObject(category_id, polygon, mask))
    image += rng.normal(0, config.noise_std, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).round().astype(np.uint8), objects


# --- COCO annotations ---------------------------------------------------------------------------

def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: run lengths over the column-major pixels, starting with zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def segmentation(obj: SceneObject, fmt: str) -> dict | list:
    """The object's COCO segmentation in `fmt` (one of SEGMENTATION_FORMATS)."""
    if fmt == "polygon":
        return [[round(v, 2) for point in obj.polygon for v in point]]
    if fmt == "rle":
        rle = mask_utils.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
        return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    if fmt == "uncompressed_rle":
        return uncompressed_rle(obj.mask)
    raise ValueError(f"unknown segmentation format {fmt!r}: use one of {SEGMENTATION_FORMATS}")


def annotation(obj: SceneObject, ann_id: int, image_id: int, fmt: str) -> dict:
    rle = mask_utils.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
    return {"id": ann_id, "image_id": image_id, "category_id": obj.category_id,
            "segmentation": segmentation(obj, fmt), "area": float(obj.mask.sum()),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0}


def write_split(out: Path, split: str, count: int, config: SyntheticConfig,
                on_image: Callable[[], None] | None = None) -> dict:
    """Write `count` images of `split` and their annotation file; returns the COCO dict."""
    rng = np.random.default_rng([config.seed, 0 if split == "train" else 1])
    image_dir = out / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    short, long = config.image_size, config.image_size * 4 // 3
    images, annotations = [], []
    for k in range(count):
        image_id = _SPLIT_ID_BASE[split] + k
        width, height = (long, short) if rng.random() < 0.5 else (short, long)
        if config.square:
            width = height = short
        num_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
        overlap = k == 0 or rng.random() < config.overlap_prob
        pixels, objects = render_scene(rng, width, height, num_objects, overlap, config)
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(pixels).save(image_dir / file_name, quality=config.jpeg_quality)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for obj in objects:
            fmt = SEGMENTATION_FORMATS[len(annotations) % len(SEGMENTATION_FORMATS)]
            annotations.append(annotation(obj, len(annotations) + 1, image_id, fmt))
        if on_image is not None:
            on_image()
    coco = {"info": {"description": f"spot-fast synthetic shapes, seed {config.seed}"},
            "images": images, "annotations": annotations,
            "categories": [dict(c, supercategory="shape") for c in CATEGORIES]}
    ann_dir = out / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    (ann_dir / f"instances_{split}2017.json").write_text(json.dumps(coco))
    return coco


LAYOUT = ("annotations", "train2017", "val2017")   # what write_synthetic puts in its folder


def check_config(config: SyntheticConfig) -> None:
    """A `DatasetError` naming the first field outside its range."""
    for label, value, minimum in (("num_train", config.num_train, 1), ("num_val", config.num_val, 1),
                                  ("image_size", config.image_size, 16), ("seed", config.seed, 0),
                                  ("min_objects", config.min_objects, 1),
                                  ("max_objects", config.max_objects, config.min_objects)):
        check_int(f"synthetic {label}", value, minimum)
    if not 0 <= config.overlap_prob <= 1 or not 1 <= config.jpeg_quality <= 100:
        raise DatasetError(f"synthetic overlap_prob must be in [0, 1] and jpeg_quality in 1..100, got "
                           f"{config.overlap_prob} and {config.jpeg_quality}")


def prepare_out(out: Path, overwrite: bool) -> None:
    """`out` must be missing or empty; with `overwrite` it may hold a synthetic dataset (only
    LAYOUT), never anything else."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{arg('out')} {out} is a file: pass a folder")
    found = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if found and not overwrite:
        raise DatasetError(f"{arg('out')} {out} is not empty: pass {arg('overwrite', True)} to replace the dataset "
                           "there, or a new folder")
    foreign = [name for name in found if name not in LAYOUT]
    if foreign:
        raise DatasetError(f"{arg('out')} {out} holds {foreign[:3]}, which spot-fast data synthetic did not write: "
                           f"{arg('overwrite', True)} replaces only a synthetic dataset; pass a new folder")


def write_synthetic(out: str | Path, config: SyntheticConfig | None = None,
                    on_image: Callable[[], None] | None = None, overwrite: bool = False) -> dict[str, int]:
    """Write the whole dataset under `out`; returns {"train": images, "val": images, "annotations": n}.

    It is written into a hidden sibling folder first and moved into place when complete, so an
    interrupted run leaves `out` as it was; `overwrite` replaces a synthetic dataset already there."""
    config = config or SyntheticConfig()
    check_config(config)
    out = Path(out)
    prepare_out(out, overwrite)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)      # left by a killed run
    try:
        train = write_split(staging, "train", config.num_train, config, on_image)
        val = write_split(staging, "val", config.num_val, config, on_image)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError):
            raise DatasetError(f"cannot write {arg('out')} {out} ({err.strerror or err}: {err.filename}): pass a "
                               "writable folder with free space") from None
        raise
    if out.is_dir():
        shutil.rmtree(out)
    staging.rename(out)
    return {"train": len(train["images"]), "val": len(val["images"]),
            "annotations": len(train["annotations"]) + len(val["annotations"])}
