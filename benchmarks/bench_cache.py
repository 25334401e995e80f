"""How fast does training read a feature cache, next to a raw memmap copy of the same bytes and next
to the reference's input path (JPEG decode + resize + crop + normalise)?

    python benchmarks/bench_cache.py                       # 1,000 images x 2 views x 196 x 768 fp16
    python benchmarks/bench_cache.py --images 2000 --save  # + JSON in benchmarks/results/

Rows of the table:
Warm rows: the median of --repeat epochs; cold rows: one epoch each, new maps after the eviction.
- raw memmap copy (baseline): the epoch's selected slabs (the sampler's global shuffle, ONE view
  per image) copied from np.memmap'd chunk files into one reused buffer, one thread -- the ceiling
  for one copy of exactly the bytes training needs.
- TrainReader, dtype=None: a full epoch of training batches in the stored fp16 (what the trainer
  reads, then `device_batches` casts on the GPU); and with float32 output (a converting copy).
- first-read check: the xxh3 hash of every chunk file, which a process runs once before it first
  reads a shard (a per-process, one-time cost; not in the TrainReader rows).
- on CUDA: TrainReader -> device_batches -> bf16 CUDA tensors, synchronised at the end.
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

from spot_fast.bench.reference.data import make_jpegs
from spot_fast.benchinfo import evict, save_result, versions
from spot_fast.cache import CacheSpec, build_cache, device_batches, epoch_batches, open_cache
from spot_fast.cache.checks import fast_hash
from spot_fast.cache.zarr_store import chunk_file
from spot_fast.config import EncoderConfig
from spot_fast.data.transforms import resize_center_crop, to_input
from spot_fast.encoders import EncoderTokens



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


def time_reader(cache, batch: int, workers: int, epoch: int, dtype=None, device: str | None = None) -> tuple[float, int]:
    """One epoch of training batches (as training reads them: the cache opened once, a reader per epoch)."""
    reader = cache.train_reader(batch, seed=0, epoch=epoch, rank=0, world_size=1, drop_last=True, workers=workers,
                                pin_memory=device is not None, dtype=dtype, check=False)
    batches = reader if device is None else device_batches(reader, device, torch.bfloat16)
    t0 = time.perf_counter()
    n = 0
    for b in batches:
        n += len(b["index"])
    if device is not None:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, n


class Memmap:
    """The baseline: each epoch's slabs (the sampler's, one view each) copied from np.memmap'd chunk
    files into one reused buffer by one plain loop; maps opened once, like the reader's."""

    def __init__(self, cache, batch: int):
        self.cache, self.batch, shape = cache, batch, cache.manifest["arrays"]["features"]["shape"]
        self.maps = [np.memmap(cache.path / chunk_file("features", 4, s["index"]), dtype=np.float16, mode="r",
                               shape=(cache.manifest["chunk_images"], *shape[1:])) for s in cache.shards]
        self.buf = np.empty((batch, *shape[2:]), np.float16)

    def epoch(self, epoch: int) -> tuple[float, int]:
        smp = self.cache.samples
        plan = epoch_batches(len(smp), self.batch, seed=0, epoch=epoch, drop_last=True, num_views=self.cache.views)
        t0 = time.perf_counter()
        n = 0
        for samples, views in plan:
            for i, (k, p, v) in enumerate(zip(smp.shard[samples].tolist(), smp.pos[samples].tolist(),
                                              views.tolist())):
                self.buf[i] = self.maps[k][p, v]
            n += len(samples)
        return time.perf_counter() - t0, n


def time_hash(files: list[Path]) -> float:
    t0 = time.perf_counter()
    for f in files:
        fast_hash(f)
    return time.perf_counter() - t0


def reference_input(data: bytes, size: int = 224) -> torch.Tensor:
    """The reference's val/train input: decode, resize shorter side (bilinear), centre crop, normalise."""
    return to_input(resize_center_crop(Image.open(io.BytesIO(data)).convert("RGB"), size))    # (3, 224, 224)


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
    ap.add_argument("--workers", type=int, default=2, help="TrainReader copy threads")
    ap.add_argument("--repeat", type=int, default=5, help="warm epochs timed per row (the median is reported)")
    ap.add_argument("--jpegs", type=int, default=200, help="JPEGs timed on the reference path")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold (evicted page cache) reads")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the cache (default: a temp dir)")
    ap.add_argument("--save", action="store_true", help="write JSON to ./bench-results/")
    args = ap.parse_args()
    for name in ("images", "views", "tokens", "dim", "chunk", "batch", "workers", "repeat", "jpegs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.images < args.batch:
        ap.error(f"--images {args.images} must be >= --batch {args.batch} (the epochs drop the last short batch)")
    grid = int(round(args.tokens ** 0.5))
    if grid * grid != args.tokens:
        ap.error(f"--tokens must be a square (a grid of patches), got {args.tokens}")
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

        results = {"write": {"seconds": write_s, "img_s": args.images / write_s, "gb_s": feat_bytes / write_s / 1e9}}
        path = work / "cache"

        def record(name, seconds, n):
            results[name] = {"seconds": seconds, "img_s": n / seconds, "gb_s": n * view_bytes / args.images / seconds / 1e9}

        modes = ["warm"] + ([] if args.no_cold else ["cold"])
        pool = {}                                       # reader buffers, kept across epochs as in training
        runs = {"memmap": lambda c, e: Memmap(c, args.batch).epoch(e),
                "reader": lambda c, e: time_reader(c, args.batch, args.workers, e),
                "reader_fp32": lambda c, e: time_reader(c, args.batch, args.workers, e, torch.float32)}
        warm = open_cache(path, allow_random_init=True)
        warm.ring_pool = pool
        for name, run in runs.items():
            run(warm, 0)                                # burn-in: buffers, threads
            times = sorted((run(warm, 1 + r) for r in range(args.repeat)), key=lambda t: t[0] / t[1])
            record(f"{name}_warm", *times[len(times) // 2])      # the median epoch (a shared machine is noisy)
        results["check_warm"] = {"seconds": time_hash(files)}
        del warm
        if "cold" in modes:
            for name, run in runs.items():
                # Mapped pages stay in the page cache: a cold run opens new maps after the eviction.
                cache = open_cache(path, allow_random_init=True)
                cache.ring_pool = pool
                evict(files)
                record(f"{name}_cold", *run(cache, 1))
                del cache
            evict(files)
            results["check_cold"] = {"seconds": time_hash(files)}
        for mode in modes:
            results[f"check_{mode}"]["gb_s"] = feat_bytes / results[f"check_{mode}"]["seconds"] / 1e9
        if torch.cuda.is_available():
            cache = open_cache(path, allow_random_init=True)
            time_reader(cache, args.batch, args.workers, 0, device="cuda")     # burn-in (CUDA context, pinned ring)
            record("reader_cuda_warm", *time_reader(cache, args.batch, args.workers, 1, device="cuda"))
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
                    f"{args.workers} reader threads, {len(os.sched_getaffinity(0))} usable cores")
    for col in ("path", "page cache", "img/s", "GB/s delivered", "vs memmap", "vs JPEG path"):
        t.add_column(col, justify="left" if col in ("path", "page cache") else "right")
    rows = [("memmap", "raw memmap copy of the selected slabs (baseline)"),
            ("reader", "TrainReader, fp16 out (dtype=None)"),
            ("reader_fp32", "TrainReader, float32 out (converting copy)")]
    for mode in modes:
        m = results[f"memmap_{mode}"]["img_s"]
        for key, label in rows:
            r = results[f"{key}_{mode}"]
            t.add_row(label, mode, f"{r['img_s']:,.0f}", f"{r['gb_s']:.2f}", f"{r['img_s'] / m:.2f}x",
                      f"{r['img_s'] / jpeg:.1f}x")
    if "reader_cuda_warm" in results:
        r, m = results["reader_cuda_warm"], results["memmap_warm"]["img_s"]
        t.add_row("TrainReader -> device_batches -> bf16 CUDA", "warm", f"{r['img_s']:,.0f}", f"{r['gb_s']:.2f}",
                  f"{r['img_s'] / m:.2f}x", f"{r['img_s'] / jpeg:.1f}x")
    j = results["jpeg_reference"]
    t.add_row(f"reference JPEG decode+resize+crop+norm (1 proc, {j['mean_jpeg_kb']:.0f} KB JPEGs, NO ViT forward)",
              "warm", f"{jpeg:,.0f}", f"{j['gb_s']:.3f}", "", "1.0x")
    w = results["write"]
    t.add_row("cache build: write + fsync + sha256 + xxh3 (random tokens, no encoder)", "", f"{w['img_s']:,.0f}",
              f"{w['gb_s']:.2f}", "", "")
    Console(width=170).print(t)
    for mode in modes:
        c, epoch = results[f"check_{mode}"], results[f"reader_{mode}"]["seconds"]
        print(f"first-read check ({mode}): xxh3 of all {feat_bytes / 1e9:.2f} GB of chunk files in {c['seconds']:.2f} s "
              f"({c['gb_s']:.1f} GB/s), once per process = {c['seconds'] / epoch:.2f}x one {mode} fp16 epoch "
              f"(which reads 1 of the {args.views} views)")
    print(f"GB/s counts the bytes delivered: one fp16 view per image ({view_bytes / 1e9:.2f} GB per epoch); the "
          f"files hold {args.views} views.")
    print("The JPEG path scales with decode workers (one per core); the cache path replaces it AND the per-epoch ViT forward.")


if __name__ == "__main__":
    main()
