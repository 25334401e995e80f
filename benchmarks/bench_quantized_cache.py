"""May I train on the 8-bit cache? The same images cached fp16, fp8 (e4m3) and int8, side by side.

    python benchmarks/bench_quantized_cache.py                 # the full run (JSON in benchmarks/results/)
    python benchmarks/bench_quantized_cache.py --seeds 2 --epochs 2 --reader-images 64   # a quick look

Four parts, each a table:
1. error: per-token relative error ||q - x|| / ||x|| of the stored tokens against an fp32 cache of
   the same images (median, p99, max), and the build's own record (`cache info`: relative RMS and
   max per layer, stage-2 tail consistency).
2. size and reader speed on a COCO-shaped cache (196 tokens x 768, 2 views + 197 split tokens, the
   real builder fed by a stand-in encoder): bytes/image (scales included) and TrainReader img/s and
   GB/s (stored bytes read) over one epoch, warm (page cache) and cold (evicted first: drop_caches
   when permitted, else posix_fadvise DONTNEED per file), the dtypes interleaved and each compared
   with fp16 in the same repeat; beside cold, the disk's own img/s for the same slabs (all handed
   to the kernel's read-ahead at once, no copy): a cold ratio between dtypes can only be judged
   against the disk's.
3. stage 1: the `tiny` preset trained from each cache (the library API, one thread per run, two
   runs at a time) over --seeds seeds; mean and standard error of the last epoch's reconstruction
   MSE against the fp16 val targets and of FG-ARI, mBO^i, mBO^c, mIoU (decoder masks, each run
   evaluated on its own cache's val split, as a user would).
4. stage 2 from each cache's split tokens for --stage2-seeds seeds, its teacher the same seed's
   stage-1 run on that cache.
The encoder is the tiny preset's random-init ViT on the synthetic "easy" scenes: the question is
whether 8-bit storage changes what training reaches, not how good a random encoder is.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from spot_fast.benchinfo import evict

DTYPES = ("fp16", "fp8", "int8")
METRICS = ("mse_vs_fp16", "fg_ari", "mbo_i", "mbo_c", "miou")


# ----------------------------------------------------------------------------- 1. caches and error

def build_synthetic_caches(work: Path, num_train: int, num_val: int) -> dict[str, Path]:
    """fp32 (the reference) and DTYPES caches of the same synthetic scenes, --split both each."""
    from spot_fast.cache import CacheSpec, build_cache
    from spot_fast.config import preset
    from spot_fast.data.sources import open_source
    from spot_fast.data.synthetic import SyntheticConfig, write_synthetic
    from spot_fast.encoders import FrozenEncoder
    data = work / "data"
    write_synthetic(data, SyntheticConfig.at_level("easy", num_train=num_train, num_val=num_val, image_size=32))
    enc_cfg = preset("tiny").encoder
    encoder = FrozenEncoder.create(enc_cfg, random_init=True, seed=0)
    out = {}
    for dtype in ("fp32", *DTYPES):
        for split in ("train", "val"):
            spec = CacheSpec("synthetic", str(data), split, enc_cfg, encoder.weights_id, split_block=enc_cfg.split_block,
                             dtype=dtype, mask_size=32)
            source = open_source("synthetic", data, split, image_size=32, mask_size=32)
            build_cache(source, encoder, spec, work / dtype / split, batch_size=32, progress=False)
        out[dtype] = work / dtype
    return out


def token_errors(caches: dict[str, Path]) -> dict:
    """Per-token relative error of every stored token against the fp32 cache, per dtype and layer."""
    from spot_fast.cache import open_cache
    ref = open_cache(caches["fp32"] / "train", allow_random_init=True)
    out = {}
    for dtype in DTYPES:
        cache = open_cache(caches[dtype] / "train", allow_random_init=True)
        row = {"build_record": cache.manifest["stored_error"]}
        for name in ("features", "split_tokens"):
            a = next(iter(ref.eval_reader(10**6, dtype=torch.float64)))[name]
            b = next(iter(cache.eval_reader(10**6, dtype=torch.float64)))[name]
            rel = ((b - a).norm(dim=-1) / a.norm(dim=-1)).flatten().numpy()
            row[name] = {"median": float(np.median(rel)), "p99": float(np.quantile(rel, 0.99)),
                         "max": float(rel.max()), "tokens": int(rel.size)}
        out[dtype] = row
    return out


# ----------------------------------------------------------------------------- 2. bytes and reader speed

class StandIn(torch.nn.Module):
    """ViT-B/16-shaped random tokens (final 196 + split 197), a one-block 'tail' that is the identity."""

    def __init__(self, cfg, batch: int):
        super().__init__()
        from spot_fast.encoders import EncoderTokens
        self.tokens_cls = EncoderTokens
        self.cfg, self.weights_id, self.num_prefix_tokens = cfg, "random-init:bench", 1
        self.vit = torch.nn.Module()
        self.vit.blocks = torch.nn.ModuleList([torch.nn.Identity()])
        g = torch.Generator().manual_seed(0)
        self.split = torch.randn(batch, 1 + cfg.num_patches, cfg.feature_dim, generator=g)

    def forward(self, images, split_block=None):
        s = self.split[: len(images)]
        return self.tokens_cls(final=s[:, 1:], split=s)

    def tail_state(self, split_block):
        return {"norm.weight": torch.ones(self.cfg.feature_dim)}


class Blank:
    name, split, image_size, mask_size = "bench", "train", 224, 320

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def image_id(self, i):
        return i

    num_views = 2

    def views_spec(self):
        return {"views": 2, "note": "benchmark: random tokens"}

    def train_views(self, i):
        return torch.zeros(2, 3, 1, 1)


def reader_speed(work: Path, images: int, batch: int, repeat: int) -> dict:
    """Each dtype's TrainReader over one epoch (one view per image), warm and cold, the dtypes
    interleaved repeat by repeat, in turn forwards and backwards (so no dtype always follows the
    same one). A shared machine's drift, or a cloud disk's changing speed, then falls on all of
    them alike, and each repeat gives a paired ratio, a dtype's img/s over fp16's in the same
    repeat: `x fp16` is the median of those (the ratio of the medians is kept as `*_vs_fp16`).
    img/s times the epoch's batches; opening the cache and its reader (where an 8-bit zarr cache
    loads its per-token scales, once per training process) is timed apart as open_s: a run pays it
    once, not every epoch. After each cold epoch, `disk_rate`: the disk's own img/s for the same
    slabs, read without the reader (its paired ratio is the disk's answer to "half the bytes")."""
    from spot_fast.cache import CacheSpec, build_cache, open_cache
    from spot_fast.config import EncoderConfig
    cfg = EncoderConfig(name="custom", image_size=224, patch_size=16, embed_dim=768, depth=1, num_heads=12,
                        split_block=0)
    paths, files, out = {}, {}, {}
    for dtype in DTYPES:
        path = paths[dtype] = work / f"coco-shaped-{dtype}"
        spec = CacheSpec("bench", "/bench", "train", cfg, "random-init:bench", split_block=0, dtype=dtype,
                         chunk_images=64, content="bench")
        build_cache(Blank(images), StandIn(cfg, 128), spec, path, batch_size=64, progress=False, device="cpu")
        files[dtype] = [f for f in path.rglob("*") if f.is_file()]
        token_bytes = sum(f.stat().st_size for f in files[dtype] if "/c/" in str(f) and
                          f.relative_to(path).parts[0] in ("features", "split_tokens", "features_scale",
                                                           "split_tokens_scale"))
        out[dtype] = {"bytes_per_image": token_bytes / images}
    runs = {d: {"warm": [], "cold": [], "disk": [], "open": []} for d in DTYPES}

    def epoch(dtype, e):
        t0 = time.perf_counter()
        reader = open_cache(paths[dtype], allow_random_init=True).train_reader(batch, seed=0, epoch=e, dtype=None,
                                                                               check=False)
        t1, n = time.perf_counter(), 0
        for b in reader:
            n += len(b["index"])
        runs[dtype]["open"].append(t1 - t0)
        return n / (time.perf_counter() - t1)

    def turn(i):
        return DTYPES if i % 2 == 0 else DTYPES[::-1]
    for dtype in DTYPES:
        epoch(dtype, 0)                                           # into the page cache
    for i in range(repeat):
        for dtype in turn(i):
            runs[dtype]["warm"].append(epoch(dtype, 1 + i))
    for i in range(repeat):
        for dtype in turn(i):
            out[dtype]["eviction"] = evict(files[dtype])
            runs[dtype]["cold"].append(epoch(dtype, 100 + i))
            evict(files[dtype])
            runs[dtype]["disk"].append(disk_rate(paths[dtype], batch, 100 + i))
    for dtype in DTYPES:
        shutil.rmtree(paths[dtype])
        row, mine, fp16 = out[dtype], runs[dtype], runs["fp16"]
        row["open_s"] = statistics.median(mine["open"])
        for kind in ("warm", "cold", "disk"):
            row[f"{kind}_runs_img_s"] = mine[kind]
            row[f"{kind}_img_s"] = statistics.median(mine[kind])
            row[f"{kind}_gb_s"] = row[f"{kind}_img_s"] * row["bytes_per_image"] / 2 / 1e9   # one view per image
            row[f"{kind}_best_img_s"] = max(mine[kind])                   # the least disturbed epoch
            row[f"{kind}_paired_x_fp16"] = statistics.median(a / b for a, b in zip(mine[kind], fp16[kind]))
    for dtype in DTYPES:
        for k in ("bytes_per_image", "warm_img_s", "warm_best_img_s", "cold_img_s", "cold_best_img_s", "disk_img_s"):
            out[dtype][k + "_vs_fp16"] = out[dtype][k] / out["fp16"][k]
    return out


def disk_rate(path: Path, batch: int, epoch: int) -> float:
    """The disk's own img/s for a cold epoch: the slabs the reader's epoch would copy (same samples,
    views and arrays), all handed to the kernel's read-ahead at once (`MappedSlabs.advise`, which the
    reader calls a few batches at a time) straight after an eviction, then waited for by touching a byte of
    every page: no copy, no batches, the reads alone. The ratio between dtypes it gives is the
    disk's, for this layout: the reader's cold ratio is to be judged against it (on a disk where a
    read costs more than its bytes, half the bytes is not half the time)."""
    import mmap
    from spot_fast.cache import open_cache
    cache = open_cache(path, allow_random_init=True)
    reader = cache.train_reader(batch, seed=0, epoch=epoch, dtype=None, check=False)
    plan = reader.plan(epoch)
    slabs = [reader.slabs[name] for name in reader.tokens]
    pages = [s.maps[f][start:start + s.nbytes:mmap.PAGESIZE] for s in slabs for samples, views in plan
             for f, start in zip(s.file[samples].tolist(), s.starts(samples, views).tolist())]   # a byte per page
    t0 = time.perf_counter()
    for s in slabs:
        for samples, views in plan:
            s.advise(samples, views)                     # the reader's own advice (no slab is resident)
    for p in pages:
        int(p.sum())                                     # a fault per page waits for its read
    seconds = time.perf_counter() - t0
    return sum(len(samples) for samples, _ in plan) / seconds


# ----------------------------------------------------------------------------- 3-4. training

def train_one(job: dict) -> dict:
    """One training run (in a worker process, one thread) and its metrics."""
    torch.set_num_threads(1)
    from spot_fast.cache import open_cache
    from spot_fast.evaluate import evaluate, reconstruction_loss
    from spot_fast.train import TrainConfig, load_run, train
    run = train(TrainConfig(stage=job["stage"], cache=job["cache"], out=job["out"], preset="tiny",
                            epochs=job["epochs"], seed=job["seed"], teacher=job.get("teacher"),
                            allow_random_init=True, device="cpu", progress=False, log_every=10**6,
                            overrides={"optim.warmup_steps": str(job["warmup"])}))
    model, _ = load_run(run)
    fp16_val = open_cache(Path(job["fp16_cache"]) / "val", allow_random_init=True)
    own_val = open_cache(Path(job["cache"]) / "val", allow_random_init=True)
    metrics = evaluate(model, own_val, orders="standard")["decoder"]
    return {**job, "mse_vs_fp16": reconstruction_loss(model, fp16_val), **{k: metrics[k] for k in METRICS[1:]}}


def summarise(rows: list[dict]) -> dict:
    """dtype -> metric -> (mean, standard error) over seeds."""
    out = {}
    for dtype in DTYPES:
        mine = [r for r in rows if r["dtype"] == dtype]
        out[dtype] = {}
        for m in METRICS:
            v = [r[m] for r in mine]
            se = statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else float("nan")
            out[dtype][m] = (statistics.fmean(v), se)
    return out


def within_2se(summary: dict) -> dict:
    """dtype -> metric -> |mean - fp16 mean| <= 2 x the combined standard error."""
    f = summary["fp16"]
    return {d: {m: abs(summary[d][m][0] - f[m][0]) <= 2 * (summary[d][m][1] ** 2 + f[m][1] ** 2) ** 0.5
                for m in METRICS} for d in DTYPES if d != "fp16"}


def print_table(title: str, summary: dict) -> None:
    print(f"\n{title}")
    print(f"{'dtype':6}" + "".join(f"{m:>20}" for m in METRICS))
    for d, row in summary.items():
        print(f"{d:6}" + "".join(f"{row[m][0]:>12.4g} ±{row[m][1]:<7.2g}" for m in METRICS))


def print_reader(errors: dict, reader: dict) -> None:
    print(f"\n{'dtype':6}{'final rel.err p50/p99':>24}{'split p50/p99':>18}{'tail cons. relRMS':>19}"
          f"{'bytes/img':>12}{'x fp16':>8}{'warm img/s':>12}{'(best)':>9}{'x fp16':>8}{'cold img/s':>12}{'x fp16':>8}"
          f"{'disk img/s':>12}{'x fp16':>8}{'open s':>9}")
    for d in DTYPES:
        e, r = errors[d], reader[d]
        tail = e["build_record"].get("tail", {}).get("rel_rms", float("nan"))
        print(f"{d:6}{e['features']['median']:>13.2e}/{e['features']['p99']:.2e}"
              f"{e['split_tokens']['median']:>9.2e}/{e['split_tokens']['p99']:.2e}{tail:>19.2e}"
              f"{r['bytes_per_image']:>12,.0f}{r['bytes_per_image_vs_fp16']:>8.3f}{r['warm_img_s']:>12,.0f}"
              f"{r['warm_best_img_s']:>9,.0f}{r['warm_paired_x_fp16']:>8.2f}{r['cold_img_s']:>12,.0f}"
              f"{r['cold_paired_x_fp16']:>8.2f}{r['disk_img_s']:>12,.0f}{r['disk_paired_x_fp16']:>8.2f}"
              f"{r['open_s']:>9.3f}")
    print("x fp16: the median over repeats of the dtype's img/s over fp16's in the same repeat")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--stage2-seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--num-train", type=int, default=96)
    p.add_argument("--num-val", type=int, default=32)
    p.add_argument("--reader-images", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--jobs", type=int, default=2, help="training runs at a time (one thread each)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--parts", choices=("all", "reader"), default="all",
                   help="reader: the error, size and reader tables only (no training)")
    args = p.parse_args()
    torch.set_num_threads(1)
    from spot_fast.benchinfo import result_path, save_result
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench-q8-"))
    result: dict = {"args": vars(args)}
    path = result_path("bench_quantized_cache", args.out or Path(__file__).parent / "results")
    try:
        caches = build_synthetic_caches(work, args.num_train, args.num_val)
        result["token_error"] = token_errors(caches)
        print(json.dumps(result["token_error"], indent=1))
        result["reader"] = reader_speed(work, args.reader_images, 64, args.repeat)
        print_reader(result["token_error"], result["reader"])
        save_result("bench_quantized_cache", result, path)
        if args.parts == "reader":
            print(f"wrote {path}")
            return
        jobs = [{"stage": 1, "dtype": d, "seed": s, "epochs": args.epochs, "cache": str(caches[d]),
                 "warmup": -(-args.num_train // 8),
                 "fp16_cache": str(caches["fp16"]), "out": str(work / "runs" / f"s1-{d}-{s}")}
                for s in range(args.seeds) for d in DTYPES]
        with ProcessPoolExecutor(args.jobs) as pool:
            rows1 = list(pool.map(train_one, jobs))
            result["stage1_runs"] = rows1
            result["stage1"] = summarise(rows1)
            result["stage1_within_2se"] = within_2se(result["stage1"])
            print_table(f"stage 1, tiny preset, {args.seeds} seeds, mean ± s.e.", result["stage1"])
            save_result("bench_quantized_cache", result, path)
            jobs2 = [{**j, "stage": 2, "teacher": j["out"], "out": j["out"].replace("/s1-", "/s2-")}
                     for j in jobs if j["seed"] < args.stage2_seeds]
            rows2 = list(pool.map(train_one, jobs2))
        result["stage2_runs"] = rows2
        result["stage2"] = summarise(rows2)
        print_table(f"stage 2, tiny preset, {args.stage2_seeds} seeds, mean ± s.e.", result["stage2"])
        result["seconds"] = time.time() - t0
        print(f"\n{result['seconds']:.0f} s; wrote {save_result('bench_quantized_cache', result, path)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
