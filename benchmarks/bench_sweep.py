"""M variants trained in ONE sweep against the same M variants trained as M separate runs.

    python benchmarks/bench_sweep.py                          # tiny preset on a synthetic cache (CPU)
    python benchmarks/bench_sweep.py --cache CACHE --preset coco --steps 200 --save   # a real cache (GPU)

Two grids of M = 4 variants: `slots` (slot_attention.num_slots: different activation shapes, so the
sweep runs them one after another on each shared batch) and `lr` (optim.lr: one architecture, so
`--stack` runs them as one vmapped model). Each row times the whole job as a user runs it --
Trainer setup, reading and moving the batches, training, checkpoints -- for `--steps` steps per
variant, without validation: M separate `train()` calls (each reads the data itself), one
`sweep()` and one `sweep(stack=True)`. Ratio = separate / sweep (> 1: the sweep is faster).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from spot_fast.benchinfo import save_result
from spot_fast.sweep.grid import expand
from spot_fast.sweep.run import SweepConfig, sweep
from spot_fast.train import TrainConfig, train

GRIDS = {"slots": "slot_attention.num_slots={}", "lr": "optim.lr=2e-4,4e-4,8e-4,1.6e-3"}


def synthetic_cache(folder: Path, preset: str, images: int) -> Path:
    """A train cache of the synthetic dataset through a random-init encoder of the preset's shape."""
    from spot_fast.cache import CacheSpec, build_cache
    from spot_fast.config import preset as get_preset
    from spot_fast.data.sources import open_source
    from spot_fast.data.synthetic import SyntheticConfig, write_synthetic
    from spot_fast.encoders import FrozenEncoder
    enc = get_preset(preset).encoder
    write_synthetic(folder / "data", SyntheticConfig(num_train=images, num_val=2, image_size=enc.image_size))
    source = open_source("synthetic", folder / "data", "train", image_size=enc.image_size, mask_size=16)
    spec = CacheSpec("synthetic", str(folder / "data"), "train", enc, "random-init:0", dtype="fp16",
                     chunk_images=64, mask_size=16)
    build_cache(source, FrozenEncoder.create(enc, random_init=True, seed=0), spec, folder / "cache",
                batch_size=32, device="cpu", progress=False)
    return folder / "cache"


def timed(fn) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): on a shared CPU box the CPU time is the steadier."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def measure(base: TrainConfig, grid: str, work: Path) -> dict:
    variants = expand([grid])
    separate = [0.0, 0.0]
    for v in variants:
        cfg = TrainConfig(**{**base.to_dict(), "out": str(work / "separate" / v.name), "overrides": v.overrides})
        separate = [a + b for a, b in zip(separate, timed(lambda: train(cfg)))]
    row = {"grid": grid, "variants": len(variants), "separate_s": separate}
    for stack in (False, True):
        cfg = TrainConfig(**{**base.to_dict(), "out": str(work / f"sweep-{stack}")})
        row["stacked_s" if stack else "sweep_s"] = timed(lambda: sweep(SweepConfig(cfg, grid=[grid], stack=stack,
                                                                                   check_memory=False)))
    for key in ("sweep", "stacked"):     # [wall, cpu] ratios
        row[f"ratio_{key}"] = [a / b for a, b in zip(separate, row[f"{key}_s"])]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, help="an existing train cache (default: build a synthetic one)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--slots", default="3,4,5,6", help="slot counts of the `slots` grid")
    p.add_argument("--images", type=int, default=128, help="images of the synthetic cache")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=24, help="steps per variant")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--save", action="store_true", help="write JSON to benchmarks/results/ (or $OUT)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    try:
        cache = args.cache or synthetic_cache(work, args.preset, args.images)
        base = TrainConfig(train_cache=str(cache), preset=args.preset, batch_size=args.batch_size, epochs=1000,
                           max_steps=args.steps, allow_random_init=True, progress=False, log_every=10_000,
                           device=args.device)
        rows = [measure(base, GRIDS["slots"].format(args.slots), work / "slots"),
                measure(base, GRIDS["lr"], work / "lr")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.preset}, batch {args.batch_size}, {args.steps} steps per variant, seconds as wall / CPU")
    print(f"{'grid':<36} {'M':>2} {'separate':>13} {'sweep':>13} {'ratio':>11} {'stacked':>13} {'ratio':>11}")
    for r in rows:
        cells = [f"{a:.1f}/{b:.1f}" for a, b in (r["separate_s"], r["sweep_s"])]
        cells += [f"{r['ratio_sweep'][0]:.2f}/{r['ratio_sweep'][1]:.2f}"]
        cells += [f"{r['stacked_s'][0]:.1f}/{r['stacked_s'][1]:.1f}",
                  f"{r['ratio_stacked'][0]:.2f}/{r['ratio_stacked'][1]:.2f}"]
        print(f"{r['grid']:<36} {r['variants']:>2} {cells[0]:>13} {cells[1]:>13} {cells[2]:>11} {cells[3]:>13} "
              f"{cells[4]:>11}")
    if args.save:
        path = save_result("bench_sweep", {"preset": args.preset, "batch_size": args.batch_size,
                                           "steps": args.steps, "cache": str(args.cache or "synthetic"),
                                           "threads": torch.get_num_threads(), "times": "[wall s, CPU s]",
                                           "rows": rows})
        print(f"saved {path}")


if __name__ == "__main__":
    main()
