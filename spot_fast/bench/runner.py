"""`spot-fast bench`: run every section, print one table with the ratios, save JSON."""
from __future__ import annotations

import functools
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from spot_fast.bench import flops
from spot_fast.bench.timing import Timing, measure
from spot_fast.bench.workloads import (FeatureBatches, JpegBatches, Options, eval_paths, make_jpegs,
                                       stage1_paths, stage2_paths, synthetic_batch)
from spot_fast.config import preset
from spot_fast.encoders import FrozenEncoder
from spot_fast.errors import UserError
from spot_fast.train.steps import stage1_forward_backward

SECTIONS = ("stage1", "stage2", "eval", "data")
# Dense bf16 tensor-core peaks (FLOP/s) of GPUs we know, for MFU.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


class BenchError(UserError, ValueError):
    """A bad bench option; the message names it and the fix."""


@dataclass
class BenchConfig:
    preset: str = "coco"            # model shapes (COCO: ViT-B/16, 196 tokens, 768 wide, 7 slots)
    batch: int | None = None        # images per step (None: 64 on GPU, 8 on CPU)
    device: str = "auto"            # "auto" | "cpu" | "cuda"
    cache: str | None = None        # a feature cache to read (None: synthetic features)
    sections: tuple[str, ...] = SECTIONS   # which parts to run
    warmup: int = 1                 # untimed calls per path before timing
    repeats: int | None = None      # timed calls per path (None: 10 on GPU, 3 on CPU)
    compile: str = "auto"           # torch.compile the fast path: "auto" (GPU only) | "on" | "off"
    precision: str = "auto"         # fast path: "auto" | "bf16" | "fp32" | "both" (fp32 and bf16 rows);
                                    # auto: bf16 on GPU; on a CPU fp32, plus bf16 where it multiplies bf16 natively
    jpegs: int = 32                 # distinct JPEGs the reference path cycles through
    data_batches: int = 8           # batches read for the data rates and the data-wait share
    out: str | None = None          # JSON folder (None: $OUT or benchmarks/results)
    save: bool = True               # write the JSON file

    def validate(self) -> None:
        """Raise BenchError naming the first bad field and what it accepts."""
        from spot_fast.config import PRESETS
        choices = {"preset": tuple(PRESETS), "device": ("auto", "cpu", "cuda"),
                   "compile": ("auto", "on", "off"), "precision": ("auto", "bf16", "fp32", "both")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise BenchError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        bad = [s for s in self.sections if s not in SECTIONS]
        if bad or not self.sections:
            raise BenchError(f"--sections must be a comma-separated subset of {','.join(SECTIONS)}, got {bad or 'none'}")
        for name, low in (("batch", 1), ("repeats", 1), ("warmup", 0), ("jpegs", 1), ("data_batches", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise BenchError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BenchError("--device cuda: no CUDA device here; use --device cpu (or auto)")
        if self.cache is not None and not (Path(self.cache) / "manifest.json").is_file():
            raise BenchError(f"--cache {self.cache}: not a feature cache (no manifest.json); "
                             f"build one with `spot-fast cache ...` or leave --cache out for synthetic features")

    def resolved(self) -> "BenchConfig":
        dev = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        gpu = dev.startswith("cuda")
        return BenchConfig(**{**asdict(self), "device": dev, "batch": self.batch or (64 if gpu else 8),
                              "repeats": self.repeats or (10 if gpu else 3),
                              "compile": ("on" if gpu else "off") if self.compile == "auto" else self.compile,
                              "precision": self.precision if self.precision != "auto" else
                              "bf16" if gpu else "both" if cpu_bf16_native() else "fp32"})

    @property
    def precisions(self) -> tuple[str, ...]:
        """The fast path's precisions, one row each (after `resolved`)."""
        return ("fp32", "bf16") if self.precision == "both" else (self.precision,)


@functools.cache
def cpu_flags() -> dict[str, str]:
    """The first processor's /proc/cpuinfo fields ({} where there is none)."""
    info: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            if not line.strip():
                break
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_bf16_native() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), where bf16 autocast
    pays; elsewhere oneDNN emulates it and it is slower than fp32."""
    flags = set(cpu_flags().get("flags", "").split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def peak_flops(device: torch.device, precision: str = "fp32") -> tuple[float | None, str]:
    """(peak FLOP/s, how it was found) of the device the fast path runs on, in `precision`.
    CPUs: cores x the reported clock x FLOP per cycle per core: fp32 FMA 32 with AVX2 (two 256-bit
    FMA pipes) or AVX-512 on AMD Zen 4 (family 25: 512-bit FMAs run as two halves), 64 with
    AVX-512 elsewhere; bf16 (AVX512-BF16 dot products) twice the fp32 figure. Where a 1024^3
    matmul runs faster than that (a turbo clock above the reported one), its rate is the peak."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
        return peak, f"{name} dense bf16 datasheet peak" if peak else f"{name}: peak unknown"
    info = cpu_flags()
    flags = set(info.get("flags", "").split())
    try:
        mhz = float(info["cpu MHz"])
    except (KeyError, ValueError):
        return None, "no clock in /proc/cpuinfo"
    zen4 = info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25"
    per_cycle = (32 if zen4 else 64) if "avx512f" in flags else 32 if {"fma", "avx2"} <= flags else 8
    if precision == "bf16":
        if "amx_bf16" in flags or "avx512_bf16" not in flags:
            return None, "bf16 peak unknown (AMX, or no native bf16)"
        per_cycle *= 2
    cores = len(os.sched_getaffinity(0))
    nominal = cores * mhz * 1e6 * per_cycle
    note = f"{cores} cores x {mhz:.0f} MHz x {per_cycle} {precision} FLOP/cycle"
    measured = matmul_rate(torch.bfloat16 if precision == "bf16" else torch.float32)
    if measured > nominal:          # the cores run above the reported clock (turbo)
        return measured, f"{note} = {nominal / 1e9:.0f} GFLOP/s nominal, but a 1024^3 matmul ran at " \
                         f"{measured / 1e9:.0f} GFLOP/s (turbo clock): that rate is used"
    return nominal, note


def matmul_rate(dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` n x n x n matmuls on the CPU."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _rows(timings: dict[str, Timing], batch: int, step_flops: dict[str, int], peaks: dict[str, float | None],
          baseline: str) -> dict:
    """One row per path; a path named `<base> bf16` is counted as `<base>` at the bf16 peak."""
    base = timings[baseline].median
    out = {}
    for name, t in timings.items():
        kind, _, precision = name.partition(" ")
        f, peak = step_flops.get(kind), peaks.get(precision or "fp32")
        out[name] = {**t.to_dict(), "ms_per_step": 1e3 * t.median, "img_s": batch / t.median,
                     "speedup_vs_" + baseline: base / t.median, "flops_per_step": f,
                     "mfu": f / t.median / peak if f and peak else None}
    return out


def data_section(cfg: BenchConfig, model_cfg, device: torch.device, jpegs: list[bytes]) -> dict:
    """Read rates (img/s, GB/s): reference JPEG pipeline, cache reader (`data_batches` batches
    after a first, untimed one), raw memmap of as many bytes; and the share of the fast stage-1
    step spent waiting for the reader. `benchmarks/bench_cache.py` measures the reader at scale."""
    from spot_fast.cache import open_cache
    n_img = cfg.data_batches * cfg.batch
    images = JpegBatches(jpegs, cfg.batch, model_cfg.encoder.image_size)
    t0 = time.perf_counter()
    for _ in range(cfg.data_batches):
        images.next()
    s = time.perf_counter() - t0
    out = {"jpeg_reference": {"img_s": n_img / s, "gb_s": sum(map(len, jpegs)) / len(jpegs) * n_img / s / 1e9}}
    if cfg.cache is None:
        out["cache_reader"] = out["raw_memmap"] = out["data_wait"] = "not measured (no --cache given)"
        return out
    cache = open_cache(cfg.cache, allow_random_init=True)
    reader = cache.train_reader(cfg.batch, seed=0, epoch=0, dtype=None)
    n, nbytes = 0, 0
    for i, batch in enumerate(reader):          # the first batch (threads, buffers) is not timed
        if i == 0:
            t0 = time.perf_counter()
            continue
        n += len(batch["features"])
        nbytes += sum(v.nbytes for k, v in batch.items() if k in ("features", "split_tokens"))
        if i == cfg.data_batches:
            break
    s = time.perf_counter() - t0
    out["cache_reader"] = {"img_s": n / s, "gb_s": nbytes / s / 1e9}
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(np.random.default_rng(0).bytes(nbytes))
        f.flush()
        t0 = time.perf_counter()
        np.array(np.memmap(f.name, dtype=np.uint8, mode="r"))
        s = time.perf_counter() - t0
    out["raw_memmap"] = {"img_s": n / s, "gb_s": nbytes / s / 1e9}
    out["data_wait"] = data_wait(cfg, model_cfg, device)
    return out


def data_wait(cfg: BenchConfig, model_cfg, device: torch.device) -> dict:
    """Run the fast stage-1 step over the cache reader; time spent blocked on the next batch."""
    from spot_fast.cache import open_cache
    from spot_fast.model import SPOT
    model = SPOT(model_cfg).to(device).train()
    opt = torch.optim.Adam(model.parameters())
    reader = open_cache(cfg.cache, allow_random_init=True).train_reader(cfg.batch, seed=0, epoch=1, dtype=None)
    wait = total = 0.0
    it = iter(reader)
    for i in range(cfg.data_batches):
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        feats = batch["features"].to(device, torch.float32, non_blocking=True)
        t1 = time.perf_counter()
        stage1_forward_backward(model, {"features": feats})
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0:                                    # the first step pays the warm-up
            wait, total = wait + t1 - t0, total + time.perf_counter() - t0
    return {"wait_s": wait, "step_s": total, "share": wait / total if total else None}


def run_bench(cfg: BenchConfig, log=print) -> dict:
    """Run the configured sections; returns the result dict (also saved as JSON when cfg.save)."""
    cfg.validate()
    cfg = cfg.resolved()
    device = torch.device(cfg.device)
    model_cfg = preset(cfg.preset)
    options = Options(device, precisions=cfg.precisions, compile=cfg.compile == "on")
    # the reference rows are fp32; the fast rows' precisions may add bf16
    peaks = {p: peak_flops(device, p) for p in dict.fromkeys(("fp32", *cfg.precisions))}
    peak_values = {p: v[0] for p, v in peaks.items()}
    B = cfg.batch
    jpegs = make_jpegs(cfg.jpegs)
    encoder = FrozenEncoder.create(model_cfg.encoder, random_init=True).to(device)
    make_reader = None
    if cfg.cache is not None:
        from spot_fast.cache import open_cache
        cache = open_cache(cfg.cache, allow_random_init=True)
        make_reader = lambda: cache.train_reader(B, seed=0, epoch=0, dtype=None)  # noqa: E731
    data = FeatureBatches(make_reader, synthetic_batch(model_cfg, B, device), options)
    result = {"config": asdict(cfg), "git_commit": git_commit(),
              "peak_flops": peak_values, "peak_note": {p: v[1] for p, v in peaks.items()},
              "flop_count": flops.__doc__.strip(), "sections": {}}
    step_flops = flops.bench_steps(model_cfg, B)
    builders = {"stage1": stage1_paths, "stage2": stage2_paths, "eval": eval_paths}
    for name in cfg.sections:
        log(f"[bench] {name} ...")
        if name == "data":
            result["sections"]["data"] = data_section(cfg, model_cfg, device, jpegs)
            continue
        images = JpegBatches(jpegs, B, model_cfg.encoder.image_size)
        paths = builders[name](model_cfg, encoder, images, data, options)
        check = None
        if name == "eval":
            paths, check_fn = paths
            check = check_fn()
        timings = measure(paths, device, cfg.warmup, cfg.repeats)
        result["sections"][name] = {"paths": _rows(timings, B, step_flops[name], peak_values, "reference")}
        if check:
            result["sections"][name]["mask_check"] = check
    if cfg.save:
        from spot_fast.benchinfo import result_path, save_result
        path = result_path("bench_train", cfg.out)
        save_result("bench_train", result, path)
        result["saved"] = str(path)
    return result


def format_table(result: dict) -> str:
    """One table: every path's ms/step, img/s, spread, peak memory, MFU and its speed-up."""
    cfg = result["config"]
    lines = [f"spot-fast bench: preset {cfg['preset']}, batch {cfg['batch']}, device {cfg['device']}, "
             f"fast path {cfg['precision']}{' + compile' if cfg['compile'] == 'on' else ''}, "
             f"{cfg['repeats']} repeats (median, [min, max])",
             f"{'section':<8} {'path':<14} {'ms/step':>10} {'spread ms':>17} {'img/s':>8} {'peak GiB':>8} "
             f"{'MFU':>6} {'speed-up':>9}",
             "-" * 88]
    for sec, body in result["sections"].items():
        if sec == "data":
            continue
        for path, r in body["paths"].items():
            ratio = next(v for k, v in r.items() if k.startswith("speedup_vs_"))
            mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            lines.append(f"{sec:<8} {path:<14} {r['ms_per_step']:>10.0f} "
                         f"{'[%.0f, %.0f]' % (1e3 * r['min_s'], 1e3 * r['max_s']):>17} {r['img_s']:>8.2f} "
                         f"{mem:>8} {mfu:>6} {ratio:>8.2f}x")
        if sec == "eval":
            p = body["paths"]
            for name, check in body["mask_check"].items():
                lines.append(f"{'':<8} {name} vs serial {p['serial']['median_s'] / p[name]['median_s']:.2f}x; "
                             f"masks vs serial fp32: max |diff| {check['max_abs_mask_diff']:.2e}, "
                             f"argmax agreement {100 * check['argmax_agreement']:.2f}%")
    if "data" in result["sections"]:
        lines.append("data     " + "; ".join(
            f"{k}: {v['img_s']:.0f} img/s {v['gb_s']:.3f} GB/s" if isinstance(v, dict) and "img_s" in v
            else f"{k}: {v if isinstance(v, str) else _wait(v)}"
            for k, v in result["sections"]["data"].items()))
    if cfg["device"] == "cpu":
        lines.append("GPU rows: not measured (no CUDA device here); run `spot-fast bench` on a GPU.")
    lines.append("MFU peak: " + "; ".join(result["peak_note"].values())
                 + " (the reference rows at the fp32 peak). Speed-up: reference median / path median.")
    return "\n".join(lines)


def _wait(v: dict) -> str:
    return f"{100 * v['share']:.1f}% of step time" if v.get("share") is not None else "n/a"
