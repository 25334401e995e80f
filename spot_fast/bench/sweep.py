"""M variants trained in ONE sweep against the same M variants trained as M separate runs.

Two grids of M variants: `slots` (slot_attention.num_slots: different activation shapes, so the
sweep runs them one after another on each shared batch) and `lr` (optim.lr: one architecture, so
`stack=True` runs them as one vmapped model). Each row times the whole job as a user runs it --
Trainer setup, reading and moving the batches, training, checkpoints -- for `steps` steps per
variant, without validation: M separate `train()` calls (each reads the data itself), one
`sweep()` and one `sweep(stack=True)`. Ratio = separate / sweep (> 1: the sweep is faster).
Times are [wall s, CPU s of this process]: on a shared CPU box the CPU time is the steadier.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from spot_fast.errors import UserError


@dataclass
class SweepBenchConfig:
    variants: int = 4               # M: variants per grid
    preset: str = "tiny"            # model hyper-parameters (the cache gives the encoder geometry)
    cache: str | None = None        # an existing train cache (None: a synthetic one is built)
    images: int = 128               # images of the synthetic cache
    batch_size: int = 16            # images per step
    steps: int = 24                 # optimiser steps per variant
    device: str | None = None       # None: cuda if present, else cpu

    def validate(self) -> None:
        for name, minimum in (("variants", 2), ("images", 2), ("batch_size", 1), ("steps", 1)):
            if getattr(self, name) < minimum:
                raise UserError(f"sweep bench: {name.replace('_', '-')} must be >= {minimum}, "
                                f"got {getattr(self, name)}")
        if self.cache is not None and not (Path(self.cache) / "manifest.json").is_file():
            raise UserError(f"sweep bench: --cache {self.cache} is not a finished train cache "
                            f"(no manifest.json): pass a train cache folder, or omit --cache")


def grids(cfg: SweepBenchConfig) -> dict[str, str]:
    """The two grids of M variants: slot counts from the preset's K up, and lrs around the preset's."""
    from spot_fast.config import preset
    model = preset(cfg.preset)
    k, lr = model.slot_attention.num_slots, model.optim.lr
    slots = ",".join(str(k + i) for i in range(cfg.variants))
    lrs = ",".join(f"{lr * 2.0 ** (i - 1):.3g}" for i in range(cfg.variants))
    return {"slots": f"slot_attention.num_slots={slots}", "lr": f"optim.lr={lrs}"}


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


def timed(fn) -> list[float]:
    """[wall seconds, this process's CPU seconds] of fn()."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return [time.perf_counter() - t0, time.process_time() - c0]


def measure(base, grid: str, work: Path) -> dict:
    """One row: M separate runs, one sweep, one stacked sweep of `grid`."""
    from spot_fast.sweep.grid import expand
    from spot_fast.sweep.run import SweepConfig, sweep
    from spot_fast.train import TrainConfig, train
    variants = expand([grid])
    separate = [0.0, 0.0]
    for v in variants:
        cfg = TrainConfig(**{**base.to_dict(), "out": str(work / "separate" / v.name), "overrides": v.overrides})
        separate = [a + b for a, b in zip(separate, timed(lambda: train(cfg)))]
    row = {"grid": grid, "variants": len(variants), "separate_s": separate}
    for stack in (False, True):
        cfg = TrainConfig(**{**base.to_dict(), "out": str(work / f"sweep-{stack}")})
        row["stacked_s" if stack else "sweep_s"] = timed(
            lambda: sweep(SweepConfig(cfg, grid=[grid], stack=stack, check_memory=False)))
    for key in ("sweep", "stacked"):
        row[f"ratio_{key}"] = [a / b for a, b in zip(separate, row[f"{key}_s"])]
    return row


def run_sweep_bench(cfg: SweepBenchConfig) -> dict:
    """Both grids' rows, with the settings they ran at."""
    from spot_fast.train import TrainConfig
    cfg.validate()
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    try:
        cache = cfg.cache or str(synthetic_cache(work, cfg.preset, cfg.images))
        base = TrainConfig(train_cache=cache, preset=cfg.preset, batch_size=cfg.batch_size, epochs=1000,
                           max_steps=cfg.steps, allow_random_init=True, progress=False, log_every=10_000,
                           device=cfg.device)
        rows = [measure(base, grid, work / name) for name, grid in grids(cfg).items()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"preset": cfg.preset, "batch_size": cfg.batch_size, "steps": cfg.steps,
            "cache": cfg.cache or "synthetic", "threads": torch.get_num_threads(), "times": "[wall s, CPU s]",
            "rows": rows}


def format_sweep_table(result: dict) -> str:
    lines = [f"{result['preset']}, batch {result['batch_size']}, {result['steps']} steps per variant, "
             f"seconds as wall / CPU (ratio = separate / sweep)",
             f"{'grid':<40} {'M':>2} {'separate':>13} {'sweep':>13} {'ratio':>11} {'stacked':>13} {'ratio':>11}"]
    for r in result["rows"]:
        cells = [f"{a:.1f}/{b:.1f}" for a, b in (r["separate_s"], r["sweep_s"])]
        cells += [f"{r['ratio_sweep'][0]:.2f}/{r['ratio_sweep'][1]:.2f}"]
        cells += [f"{r['stacked_s'][0]:.1f}/{r['stacked_s'][1]:.1f}",
                  f"{r['ratio_stacked'][0]:.2f}/{r['ratio_stacked'][1]:.2f}"]
        lines.append(f"{r['grid']:<40} {r['variants']:>2} " + " ".join(f"{c:>{w}}" for c, w in
                                                                     zip(cells, (13, 13, 11, 13, 11))))
    return "\n".join(lines)
