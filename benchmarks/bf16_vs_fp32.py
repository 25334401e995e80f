"""Does bf16 autocast training land where fp32 training does, on this CPU? The proof that decides
`--precision auto` on CPUs that multiply bf16 in hardware (AVX512-BF16, AMX).

    python benchmarks/bf16_vs_fp32.py --save              # 8 seeds each: ~6 min quiet, ~15 min on 2 busy cores
    python benchmarks/bf16_vs_fp32.py --seeds 2 --epochs 2   # a quick look

Stage 1 of the `tiny` preset (its model and batch; the demo's lr and slot init) on a synthetic
dataset and its cache, made with the library as `spot-fast demo` makes its own: the "spaced" scenes
at the tiny encoder's 32 px, cached by a random-init tiny ViT with the demo's sin-cos position table
(features carry colour and place). Each seed trains once in fp32 and once under bf16 autocast
(`TrainConfig.precision`), one torch thread per run; a seed fixes init, data order, slot noise and
patch orders, so the two runs of a seed start alike and differ only by rounding (which, in a chaotic
run, still sends them apart). Evaluation (all patch orders) is fp32 in both.

Metrics per run: last-epoch MSE (the training loss over the last epoch), the val reconstruction MSE
after it, and FG-ARI, mBO^i, mBO^c, mIoU of the decoder and the slot-attention masks on the val split.
Verdict: bf16 lands where fp32 does iff, for every metric, |mean(bf16) - mean(fp32)| <= 2 standard
errors of fp32's mean (standard error = sample std / sqrt(seeds)). The rule is strict: with two
identical distributions and 8 seeds a metric passes it only ~80% of the time (the gap carries both
means' noise), so a pass on every metric is strong evidence, and one failed metric in a run is not
proof of a difference. The table also gives the gap in standard errors of the difference of the two
means (sqrt(se_fp32^2 + se_bf16^2); ~93% pass at 2 under identical distributions) and the mean
within-seed (paired) difference.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from spot_fast.benchinfo import save_result
from spot_fast.config import preset

PRECISIONS = ("fp32", "bf16")
METRICS = ("fg_ari", "mbo_i", "mbo_c", "miou")
MASKS = ("decoder", "slot_attention")
# (key in a row, title): the verdict is taken over all of them
COLUMNS = [("train_mse", "last-epoch MSE"), ("val_mse", "val MSE")] + [
    (f"{m}/{k}", f"{'dec' if m == 'decoder' else 'SA'} {t}") for m in MASKS
    for k, t in zip(METRICS, ("FG-ARI", "mBO^i", "mBO^c", "mIoU"))]


@dataclass
class Bf16Config:
    seeds: int = 8              # training seeds per precision (0 .. seeds-1)
    num_train: int = 1024       # synthetic training images (128 steps of the tiny batch of 8 per epoch)
    num_val: int = 128          # synthetic val images: every metric is over these
    epochs: int = 16            # stage-1 epochs per run (one of lr warm-up, then the cosine decay)
    lr: float = 4e-3            # peak lr, the demo's (the tiny preset's 4e-4 barely moves in 2k steps)
    slot_init: str = "embedding"  # the demo's stage-1 slot init (shared_gaussian, tiny's, segments little here)
    level: str = "spaced"       # synthetic scene level (spot_fast.data.synthetic.LEVELS): the demo's
    work: str | None = None     # folder for the data, cache and runs (None: a temporary one, removed)
    threads: int = 1            # torch intra-op threads per run


def make_cache(cfg: Bf16Config, work: Path) -> Path:
    """The synthetic dataset and its train and val caches (work/cache/{train,val}); returns work/cache."""
    from spot_fast.cache import CacheSpec, build_cache
    from spot_fast.data.sources import open_source
    from spot_fast.data.synthetic import SyntheticConfig, write_synthetic
    from spot_fast.demo import demo_encoder, demo_encoder_id
    enc = dataclasses.replace(preset("tiny").encoder, position="sincos", position_scale=1.0)
    data, folder = work / "data", work / "cache"
    write_synthetic(data, SyntheticConfig.at_level(cfg.level, num_train=cfg.num_train, num_val=cfg.num_val,
                                                   image_size=enc.image_size, seed=0))
    encoder = demo_encoder(enc, seed=0)
    for split in ("train", "val"):
        spec = CacheSpec("synthetic", str(data), split, enc, demo_encoder_id(enc, 0), split_block=enc.split_block,
                         mask_size=enc.image_size)
        source = open_source("synthetic", data, split, image_size=enc.image_size, mask_size=enc.image_size)
        build_cache(source, encoder, spec, folder / split, batch_size=64, num_workers=0, device="cpu",
                    progress=False)
    return folder


def one_run(cfg: Bf16Config, cache: Path, out: Path, precision: str, seed: int) -> dict:
    """Train stage 1 once; its row: precision, seed, seconds and every metric."""
    from spot_fast.train import TrainConfig, train
    steps_per_epoch = cfg.num_train // preset("tiny").optim.batch_size        # drop_last
    tcfg = TrainConfig(stage=1, cache=str(cache), out=str(out), preset="tiny", epochs=cfg.epochs, lr=cfg.lr,
                       seed=seed, precision=precision, allow_random_init=True, device="cpu", progress=False,
                       log_every=steps_per_epoch, eval_batch_size=64,
                       overrides={"optim.warmup_steps": str(steps_per_epoch), "slot_attention.init": cfg.slot_init})
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    run = train(tcfg)
    seconds = time.perf_counter() - t0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    last = [r for r in log if r["kind"] == "train"][-1]       # log_every = one epoch: the last epoch's mean
    val = [r for r in log if r["kind"] == "val"][-1]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    row = {"precision": precision, "seed": seed, "seconds": round(seconds, 2), "steps": last["step"],
           "train_mse": last["mse"] if "mse" in last else last["loss"], "val_mse": val["loss"]}
    row.update({f"{m}/{k}": metrics[m][k] for m in MASKS for k in METRICS})
    return row


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n); 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def compare(rows: list[dict]) -> dict:
    """Per metric: each precision's mean and standard error, the gap in fp32 standard errors (the
    verdict's test), in standard errors of the difference, and the paired per-seed difference."""
    by = {p: {r["seed"]: r for r in rows if r["precision"] == p} for p in PRECISIONS}
    seeds = sorted(set(by["fp32"]) & set(by["bf16"]))
    out = {}
    for key, _ in COLUMNS:
        (m32, s32), (m16, s16) = (mean_se([by[p][s][key] for s in seeds]) for p in PRECISIONS)
        dm, dse = mean_se([by["bf16"][s][key] - by["fp32"][s][key] for s in seeds])
        gap = abs(m16 - m32)
        out[key] = {"fp32_mean": m32, "fp32_se": s32, "bf16_mean": m16, "bf16_se": s16,
                    "gap_in_fp32_se": gap / s32 if s32 > 0 else (0.0 if gap == 0 else math.inf),
                    "gap_in_diff_se": gap / math.hypot(s32, s16) if s32 or s16 else 0.0,
                    "paired_diff_mean": dm, "paired_diff_se": dse, "within_2_se": gap <= 2 * s32}
    return out


def format_table(comparison: dict, seeds: int) -> str:
    head = ["metric", "fp32 mean +- se", "bf16 mean +- se", "|gap|/se32", "|gap|/se_diff", "paired bf16-fp32", "ok"]
    body = []
    for key, title in COLUMNS:
        c = comparison[key]
        digits = 4 if "mse" in key else 2
        body.append([title, f"{c['fp32_mean']:.{digits}f} +- {c['fp32_se']:.{digits}f}",
                     f"{c['bf16_mean']:.{digits}f} +- {c['bf16_se']:.{digits}f}", f"{c['gap_in_fp32_se']:.2f}",
                     f"{c['gap_in_diff_se']:.2f}",
                     f"{c['paired_diff_mean']:+.{digits}f} +- {c['paired_diff_se']:.{digits}f}",
                     "yes" if c["within_2_se"] else "NO"])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [head, *body]]
    return f"stage 1, tiny preset, {seeds} seeds per precision (se: standard error of the mean)\n" + "\n".join(lines)


def run(cfg: Bf16Config, say=print) -> dict:
    """Build the cache, train every (seed, precision), compare; the result dict (no hardware/date)."""
    work = Path(cfg.work) if cfg.work else Path(tempfile.mkdtemp(prefix="bf16-vs-fp32-"))
    try:
        t0 = time.perf_counter()
        cache = make_cache(cfg, work)
        say(f"data and cache: {cfg.num_train} + {cfg.num_val} images in {time.perf_counter() - t0:.1f}s")
        rows = []
        for seed in range(cfg.seeds):
            for precision in PRECISIONS:
                rows.append(one_run(cfg, cache, work / "runs" / f"{precision}-{seed}", precision, seed))
                r = rows[-1]
                say(f"seed {seed} {precision}: {r['seconds']:.1f}s  last-epoch MSE {r['train_mse']:.4f}  "
                    f"dec FG-ARI {r['decoder/fg_ari']:.1f}  mBO^i {r['decoder/mbo_i']:.1f}")
    finally:
        if not cfg.work:
            shutil.rmtree(work, ignore_errors=True)
    comparison = compare(rows)
    same = all(c["within_2_se"] for c in comparison.values())
    verdict = ("bf16 lands where fp32 does: every metric's bf16 mean is within 2 standard errors of fp32's"
               if same else "bf16 does NOT land where fp32 does: " + ", ".join(
                   t for k, t in COLUMNS if not comparison[k]["within_2_se"]) + " outside 2 standard errors")
    return {"config": dataclasses.asdict(cfg), "bf16_in_hardware": _bf16_flags(), "rows": rows,
            "comparison": comparison, "bf16_lands_where_fp32_does": same, "verdict": verdict}


def _bf16_flags() -> list[str]:
    """The CPU's bf16 multiply instructions (from /proc/cpuinfo; empty where there are none)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "avx_ne_convert"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Bf16Config()
    p.add_argument("--seeds", type=int, default=d.seeds)
    p.add_argument("--num-train", type=int, default=d.num_train)
    p.add_argument("--num-val", type=int, default=d.num_val)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--slot-init", default=d.slot_init, choices=("embedding", "shared_gaussian"))
    p.add_argument("--work", default=None, help="keep data, cache and runs here (default: a temporary folder)")
    p.add_argument("--save", action="store_true", help="write JSON to benchmarks/results/ (or $OUT)")
    a = p.parse_args()
    cfg = Bf16Config(seeds=a.seeds, num_train=a.num_train, num_val=a.num_val, epochs=a.epochs, lr=a.lr,
                     slot_init=a.slot_init, work=a.work)
    result = run(cfg)
    print(format_table(result["comparison"], cfg.seeds))
    seconds = {p: mean_se([r["seconds"] for r in result["rows"] if r["precision"] == p])[0] for p in PRECISIONS}
    print("mean seconds per run: " + ", ".join(f"{p} {s:.1f}" for p, s in seconds.items()))
    print(result["verdict"])
    if a.save:
        print(f"saved {save_result('bf16_vs_fp32', result)}")


if __name__ == "__main__":
    main()
