"""A small in-memory `Source` for the cache tests, and a build entry point for subprocess tests.

A helper, not a test module (it holds no tests).
Run as a script to build a cache in a separate process (resume and multi-rank tests):
    python tests/cache_fakes.py '{"out": "...", "n": 10, "format": "zarr", ...}'
"""
from __future__ import annotations

import io
import json
import sys

import numpy as np
import torch
from PIL import Image

from spot_fast.data.base import BadImage, ValSample

IMAGE_SIZE, MASK_SIZE = 32, 16   # the tiny preset's encoder resolution; small masks


def fake_image(seed: int, index: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100_003 + index)
    return torch.randn(3, size, size, generator=g)


class FakeSource:
    """n random images; train: views (original, h-flipped); val: masks + JPEG. `bad` rows raise BadImage;
    `scale` multiplies rows' pixels (NaN, or a huge factor that overflows fp16)."""

    def __init__(self, n: int = 10, split: str = "train", bad: tuple[int, ...] = (), seed: int = 0,
                 image_size: int = IMAGE_SIZE, mask_size: int = MASK_SIZE, name: str = "fake",
                 scale: dict[int, float] | None = None):
        self.n, self.split, self.bad, self.seed = n, split, set(bad), seed
        self.scale = {int(k): v for k, v in (scale or {}).items()}
        self.image_size, self.mask_size, self.name = image_size, mask_size, name

    def __len__(self) -> int:
        return self.n

    def image_id(self, index: int) -> int:
        return 1000 + index

    @property
    def num_views(self) -> int:
        return 2

    def views_spec(self) -> dict:
        return {"views": ["original", "hflip"], "transform": "random normal test images"}

    def _check(self, index: int) -> None:
        if index in self.bad:
            raise BadImage(f"/fake/img{index}.jpg", "truncated file")

    def train_views(self, index: int) -> torch.Tensor:
        self._check(index)
        x = fake_image(self.seed, index, self.image_size) * self.scale.get(index, 1.0)
        return torch.stack([x, x.flip(-1)])                              # (2, 3, S, S)

    def val_sample(self, index: int) -> ValSample:
        self._check(index)
        x = fake_image(self.seed, index, self.image_size)
        rng = np.random.default_rng([self.seed, index])
        m = self.mask_size
        pixels = rng.integers(0, 255, (self.image_size, self.image_size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        return ValSample(image=x, jpeg=buf.getvalue(),
                         instance_mask=torch.from_numpy(rng.integers(0, 4, (m, m))),
                         class_mask=torch.from_numpy(rng.integers(0, 80, (m, m))),
                         ignore_mask=torch.from_numpy(rng.integers(0, 2, (m, m)).astype(np.uint8)))


def tiny_spec(root, split: str = "train", dataset: str = "fake", **kw):
    from spot_fast.cache import CacheSpec
    from spot_fast.config import preset
    kw.setdefault("chunk_images", 4)
    kw.setdefault("mask_size", MASK_SIZE)
    return CacheSpec(dataset, str(root), split, preset("tiny").encoder, "random-init:0", **kw)


def tiny_encoder():
    from spot_fast.config import preset
    from spot_fast.encoders import FrozenEncoder
    return FrozenEncoder.create(preset("tiny").encoder, random_init=True, seed=0)


def build_tiny(out, n: int = 10, split: str = "train", bad=(), batch_size: int = 3, num_workers: int = 0,
               root: str = "/fake/data", scale=None, **spec_kw):
    from spot_fast.cache import build_cache
    source = FakeSource(n, split, bad=tuple(bad), scale=scale)
    spec = tiny_spec(root, split, **spec_kw)
    return build_cache(source, tiny_encoder(), spec, out, batch_size=batch_size, num_workers=num_workers,
                       device="cpu", progress=False)


def main(argv: list[str]) -> None:
    from spot_fast.cache import CacheError
    torch.set_num_threads(1)    # bit-identical GEMMs whatever the process layout
    args = json.loads(argv[1])
    try:
        result = build_tiny(args.pop("out"), **args)
    except CacheError as e:     # as the CLI does: one line, exit 1
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"images_built": result.images_built, "resumed": result.shards_resumed,
                      "already": result.already_cached}))


if __name__ == "__main__":
    main(sys.argv)
