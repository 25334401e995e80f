"""The reference's image and mask pre-processing, without torchvision.

Every function reproduces one torchvision transform applied to a PIL image, bit for bit:

- `resize_shorter`  == `transforms.Resize(size, interpolation)` (PIL `Image.resize`, the longer
  side becomes `int(size * long / short)`, truncated, as torchvision computes it);
- `center_crop`     == `transforms.CenterCrop(size)` (offsets `int(round((h - size) / 2.0))`);
- `to_tensor`       == `transforms.ToTensor()` (uint8 -> float32 / 255, CHW);
- `normalize`       == `transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)` (subtract, then divide).

Images are opened with `load_rgb`, which turns every decoding failure into `BadImage`. Unlike the
reference (which sets `ImageFile.LOAD_TRUNCATED_IMAGES = True` and silently pads truncated files
with grey), a truncated file is a `BadImage`: a cache must not store features of half an image.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from spot_fast.data.base import BadImage

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JPEG_QUALITY = 90  # quality of `ValSample.jpeg` (pictures only, never fed to a model)


def load_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Open and fully decode `path` as a PIL image in `mode`; any failure raises `BadImage`.

    `mode=None` keeps the file's own mode (palette PNG masks must keep their indices).
    """
    path = Path(path)
    if not path.is_file():
        raise BadImage(path, "file not found")
    try:
        with Image.open(path) as img:
            img.load()  # forces the whole decode: truncated files raise here
            if mode is None:
                return img.copy()
            return eight_bit(img).convert(mode)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = str(err) or type(err).__name__
        if "truncated" in reason.lower():
            reason = f"{reason} (truncated files are skipped, not padded as the reference does)"
        raise BadImage(path, reason) from err


# PIL modes of 16-bit and 32-bit integer greyscale images (16-bit PNG, TIFF); `convert("RGB")` clips
# their values at 255 instead of scaling them, so almost every pixel would come out white.
_WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def eight_bit(img: Image.Image) -> Image.Image:
    """`img` with 16-bit greyscale scaled to 8 bits (v * 255 / 65535, rounded); other modes as they are."""
    if img.mode not in _WIDE_GREY:
        return img
    values = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(values * (255 / 65535)), 0, 255).astype(np.uint8), mode="L")


def load_rgb(path: str | Path) -> Image.Image:
    """Open `path` as an RGB image (the reference's `Image.open(p).convert('RGB')`)."""
    return load_image(path, "RGB")


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(new_width, new_height) with the shorter side = `size`, as torchvision's Resize(int)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def resize_shorter(img: Image.Image, size: int,
                   resample: Image.Resampling = Image.Resampling.BILINEAR) -> Image.Image:
    """Resize so that the shorter side is `size` (torchvision `Resize(size)` on a PIL image)."""
    new_size = resized_size(img.width, img.height, size)
    if new_size == img.size:
        return img  # torchvision returns the input unchanged in this case
    return img.resize(new_size, resample)


def center_crop_offsets(width: int, height: int, size: int) -> tuple[int, int]:
    """(left, top) of torchvision's centre crop of a `size` x `size` square."""
    if size > width or size > height:
        raise ValueError(f"centre crop {size} is larger than the image ({width}x{height})")
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


def crop(img: Image.Image, left: int, top: int, size: int) -> Image.Image:
    """The `size` x `size` square whose top-left corner is (left, top)."""
    return img.crop((left, top, left + size, top + size))


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision `CenterCrop(size)` (no padding: the image must be at least `size` each way)."""
    left, top = center_crop_offsets(img.width, img.height, size)
    return crop(img, left, top, size)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """torchvision `ToTensor` for an 8-bit RGB image: (3, H, W) float32 in [0, 1]."""
    array = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous().to(torch.float32).div(255)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """torchvision `Normalize(IMAGENET_MEAN, IMAGENET_STD)` on a (3, H, W) float32 tensor."""
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=x.dtype).view(-1, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, dtype=x.dtype).view(-1, 1, 1)
    return x.sub(mean).div(std)


def to_input(img: Image.Image) -> torch.Tensor:
    """ToTensor + ImageNet Normalize: what the ViT is fed. (3, H, W) float32."""
    return normalize(to_tensor(img))


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of a (..., H, W) tensor (RandomHorizontalFlip when it fires)."""
    return x.flip(-1)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize shorter side to `size` (bilinear), centre crop `size`: the COCO/val image transform."""
    return center_crop(resize_shorter(img, size), size)


def flip_pair(crop_img: Image.Image) -> torch.Tensor:
    """(2, 3, S, S): the normalised crop and its horizontal flip (flip after crop, as the reference)."""
    x = to_input(crop_img)
    return torch.stack([x, hflip(x)])


def center_flip_spec(source: str, split: str, size: int) -> dict:
    """The views_spec of sources whose views are `flip_pair(resize_center_crop(...))`; a val
    split stores only the centre crop (view 0), with its masks."""
    rule = f"resize shorter side to {size} (PIL bilinear), centre crop {size}, ImageNet normalise"
    if split == "val":
        return {"source": source, "split": split, "image_size": size, "num_views": 1, "views": ["original"],
                "rule": rule + "; masks: NEAREST resize of the shorter side + centre crop to the mask size"}
    return {"source": source, "split": split, "image_size": size, "num_views": 2, "views": ["original", "hflip"],
            "rule": rule + "; view 1 = view 0 flipped horizontally"}


def mask_resize_center_crop(mask: Image.Image, size: int) -> np.ndarray:
    """Ground-truth mask transform: NEAREST resize shorter side to `size`, centre crop. (size, size)."""
    out = center_crop(resize_shorter(mask, size, Image.Resampling.NEAREST), size)
    return np.asarray(out).copy()


def encode_jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of an RGB image."""
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
