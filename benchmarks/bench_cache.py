"""How fast does training read a feature cache, next to the bytes' raw read rate and next to the
reference's input path (JPEG decode + resize + crop + normalise)?

    python benchmarks/bench_cache.py                       # 1,000 images x 2 views x 196 x 768 fp16
    python benchmarks/bench_cache.py --images 2000 --save  # + JSON in benchmarks/results/

Rows of the table:
- cache TrainReader (zarr): a full epoch of training batches (one random view per image, chunk +
  window shuffle, float32 output) -- what training consumes.
- raw numpy.memmap: the same chunk files copied into memory, nothing else -- the ceiling.
- reference JPEG path: PIL decode of COCO-sized JPEGs + resize shorter side to 224 + centre crop +
  normalise, one process, WITHOUT the ViT forward the reference also runs on every image every
  epoch (on a GPU that forward costs far more than this decode; the cache skips both).
"warm" reads come from the page cache (files just written); "cold" ones are evicted first with
posix_fadvise(DONTNEED), so they come from the disk. The cache is written with random tokens
through the real builder (a stand-in encoder that returns random tensors); uncompressed, so the
values do not change any timing.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spot_fast.benchinfo import save_result, versions
from spot_fast.cache import CacheSpec, build_cache, open_cache
from spot_fast.cache.zarr_store import chunk_file
from spot_fast.config import EncoderConfig
from spot_fast.encoders import EncoderTokens

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class RandomTokens(torch.nn.Module):
    """Stand-in for FrozenEncoder: ViT-B/16-shaped random tokens, no compute worth timing."""

    def __init__(self, cfg: EncoderConfig, batch: int):
        super().__init__()
        self.cfg, self.weights_id, self.num_prefix_tokens = cfg, "random-init:bench", 1
        g = torch.Generator().manual_seed(0)
        self.block = torch.randn(batch, cfg.num_patches, cfg.feature_dim, generator=g)

    def forward(self, images: torch.Tensor, split_block=None) -> EncoderTokens:
        return EncoderTokens(final=self.block[: len(images)])


class BlankSource:
    """n images of V tiny blank views (the stand-in encoder ignores pixels)."""
    name, split, image_size, mask_size = "bench", "train", 224, 320

    def __init__(self, n: int, views: int):
        self.n, self.views = n, views

    def __len__(self):
        return self.n

    def image_id(self, i):
        return i

    @property
    def num_views(self):
        return self.views

    def views_spec(self):
        return {"views": self.views, "note": "benchmark: random tokens"}

    def train_views(self, i):
        return torch.zeros(self.views, 3, 1, 1)


def evict(paths: list[Path]) -> None:
    """Drop the files from the page cache (clean pages only: fine after fsync-free writes + sync)."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_reader(cache, batch: int, window: int, dtype=torch.float32) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for b in cache.train_reader(batch, seed=0, rank=0, world_size=1, window=window, pin_memory=False, dtype=dtype):
        n += len(b["index"])
    return time.perf_counter() - t0, n


def time_memmap(files: list[Path], shape_of) -> float:
    t0 = time.perf_counter()
    for f in files:
        mm = np.memmap(f, dtype=np.float16, mode="r", shape=shape_of(f))
        np.array(mm)            # copy the chunk into memory
        del mm
    return time.perf_counter() - t0


def make_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """COCO-like JPEGs: 640x480 smooth random scenes, quality 90."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((640, 480), Image.BICUBIC)
        noisy = np.asarray(img, np.int16) + rng.integers(-12, 13, (480, 640, 3))
        buf = io.BytesIO()
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def reference_input(data: bytes, size: int = 224) -> torch.Tensor:
    """The reference's val/train input: decode, resize shorter side (bilinear), centre crop, normalise."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    return (x - IMAGENET_MEAN) / IMAGENET_STD                       # (3, 224, 224)


def time_jpeg(jpegs: list[bytes]) -> float:
    reference_input(jpegs[0])                                       # burn-in
    t0 = time.perf_counter()
    for data in jpegs:
        reference_input(data)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1000, help="images in the synthetic cache")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=196, help="N (196 = 224px / patch 16)")
    ap.add_argument("--dim", type=int, default=768, help="D (768 = ViT-B)")
    ap.add_argument("--chunk", type=int, default=64, help="images per zarr chunk")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--window", type=int, default=4, help="chunks shuffled together in memory")
    ap.add_argument("--jpegs", type=int, default=200, help="JPEGs timed on the reference path")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold (evicted page cache) reads")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the cache (default: a temp dir)")
    ap.add_argument("--save", action="store_true", help="write JSON to benchmarks/results/")
    args = ap.parse_args()
    grid = int(round(args.tokens ** 0.5))
    assert grid * grid == args.tokens, "--tokens must be a square"
    cfg = EncoderConfig("custom", image_size=grid * 16, patch_size=16, embed_dim=args.dim, depth=12, num_heads=12)

    work = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=args.dir))
    try:
        spec = CacheSpec("bench", str(work), "train", cfg, "random-init:bench", chunk_images=args.chunk)
        t0 = time.perf_counter()
        build_cache(BlankSource(args.images, args.views), RandomTokens(cfg, args.batch * args.views), spec,
                    work / "cache", batch_size=args.batch, device="cpu", progress=False)
        write_s = time.perf_counter() - t0
        cache = open_cache(work / "cache", allow_random_init=True)
        files = [work / "cache" / chunk_file("features", 4, s["index"]) for s in cache.shards]
        feat_bytes = sum(f.stat().st_size for f in files)
        view_bytes = args.images * args.tokens * args.dim * 2   # one fp16 view per image
        row_shape = (args.views, args.tokens, args.dim)
        shape_of = lambda f: (f.stat().st_size // (2 * int(np.prod(row_shape))), *row_shape)  # noqa: E731

        results = {"write": {"seconds": write_s, "img_s": args.images / write_s, "gb_s": feat_bytes / write_s / 1e9}}
        time_reader(cache, args.batch, args.window)                 # burn-in (imports, page cache)
        modes = ["warm"] + ([] if args.no_cold else ["cold"])
        for mode in modes:
            if mode == "cold":
                evict(files)
            s, n = time_reader(cache, args.batch, args.window)
            assert n == args.images // args.batch * args.batch
            results[f"reader_{mode}"] = {"seconds": s, "img_s": n / s, "gb_s": feat_bytes * n / args.images / s / 1e9}
            if mode == "cold":
                evict(files)
            s = time_memmap(files, shape_of)
            results[f"memmap_{mode}"] = {"seconds": s, "img_s": args.images / s, "gb_s": feat_bytes / s / 1e9}
            if mode == "warm":
                s, n = time_reader(cache, args.batch, args.window, dtype=None)
                results["reader_fp16_warm"] = {"seconds": s, "img_s": n / s,
                                               "gb_s": feat_bytes * n / args.images / s / 1e9}
        jpegs = make_jpegs(args.jpegs)
        s = time_jpeg(jpegs)
        results["jpeg_reference"] = {"seconds": s, "img_s": len(jpegs) / s,
                                     "gb_s": sum(map(len, jpegs)) / s / 1e9,
                                     "mean_jpeg_kb": sum(map(len, jpegs)) / len(jpegs) / 1e3}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report(args, results, feat_bytes, view_bytes, modes)
    if args.save:
        path = save_result("bench_cache", {
            "versions": versions("numpy", "zarr", "webdataset", "PIL"),
            "args": {k: str(v) for k, v in vars(args).items()},
            "bytes": {"features_on_disk": feat_bytes, "one_view": view_bytes}, "results": results})
        print(f"saved {path}")


def report(args, results: dict, feat_bytes: int, view_bytes: int, modes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table
    jpeg = results["jpeg_reference"]["img_s"]
    t = Table(title=f"cache read: {args.images} images x {args.views} views x {args.tokens} x {args.dim} fp16 "
                    f"({feat_bytes / 1e9:.2f} GB on disk), chunks of {args.chunk}, batch {args.batch}, "
                    f"{len(os.sched_getaffinity(0))} usable cores")
    for col in ("path", "page cache", "img/s", "GB/s read", "vs memmap", "vs JPEG path"):
        t.add_column(col, justify="left" if col in ("path", "page cache") else "right")
    for mode in modes:
        r, m = results[f"reader_{mode}"], results[f"memmap_{mode}"]
        t.add_row("cache TrainReader (zarr, float32 out)", mode, f"{r['img_s']:,.0f}", f"{r['gb_s']:.2f}",
                  f"{r['img_s'] / m['img_s']:.2f}x", f"{r['img_s'] / jpeg:.1f}x")
        if mode == "warm":
            r = results["reader_fp16_warm"]
            t.add_row("cache TrainReader (zarr, fp16 out: dtype=None)", mode, f"{r['img_s']:,.0f}", f"{r['gb_s']:.2f}",
                      f"{r['img_s'] / m['img_s']:.2f}x", f"{r['img_s'] / jpeg:.1f}x")
        t.add_row("raw numpy.memmap copy of the chunks", mode, f"{m['img_s']:,.0f}", f"{m['gb_s']:.2f}",
                  "1.00x", f"{m['img_s'] / jpeg:.1f}x")
    j = results["jpeg_reference"]
    t.add_row(f"reference JPEG decode+resize+crop+norm (1 proc, {j['mean_jpeg_kb']:.0f} KB JPEGs, NO ViT forward)",
              "warm", f"{jpeg:,.0f}", f"{j['gb_s']:.3f}", "", "1.0x")
    w = results["write"]
    t.add_row("cache build: write + sha256 (random tokens, no encoder)", "", f"{w['img_s']:,.0f}", f"{w['gb_s']:.2f}",
              "", "")
    Console(width=160).print(t)
    print(f"GB/s counts the bytes read from disk: the reader reads all {args.views} views of a chunk and keeps one "
          f"random view per image ({view_bytes / 1e9:.2f} GB delivered per epoch, as float32 {2 * view_bytes / 1e9:.2f} GB).")
    print("The JPEG path scales with decode workers (one per core); the cache path replaces it AND the per-epoch ViT forward.")


if __name__ == "__main__":
    main()
