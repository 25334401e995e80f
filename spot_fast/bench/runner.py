"""`spot-fast bench`: run the sections, one table with the ratios, JSON into a results folder."""
from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from spot_fast.bench import flops
from spot_fast.bench.peaks import cpu_bf16_native, peak
from spot_fast.bench.sections import run_sections
from spot_fast.config import preset
from spot_fast.errors import UserError

SECTIONS = ("stage1", "stage2", "eval", "data", "contended", "sweep")
DEFAULT_SECTIONS = ("stage1", "stage2", "eval", "data")


class BenchError(UserError, ValueError):
    """A bad bench option; the message names it and the fix."""


@dataclass
class BenchConfig:
    preset: str = "coco"            # model shapes (COCO: ViT-B/16, 196 tokens, 768 wide, 7 slots)
    batch: int | None = None        # images per step (None: 64 on GPU, 8 on CPU)
    device: str = "auto"            # "auto" | "cpu" | "cuda"
    cache: str | None = None        # a feature cache (or a --split both folder) to read; None: one is built
    sections: tuple[str, ...] = DEFAULT_SECTIONS   # which parts to run (a subset of SECTIONS)
    warmup: int = 1                 # untimed calls per row before timing
    repeats: int | None = None      # timed calls per row (None: 10 on GPU, 3 on CPU)
    compile: str = "auto"           # torch.compile the fast rows: "auto" (GPU only) | "on" | "off"
    precision: str = "auto"         # fast rows: "auto" | "bf16" | "fp32" | "both" (fp32 and bf16 rows);
                                    # auto: bf16 on GPU; on a CPU fp32, plus bf16 where it multiplies bf16 natively
    threads: int | None = None      # torch intra-op threads (None: spot_fast.threads' policy)
    reference_repo: str | None = None   # a reference checkout: its own code runs the reference rows
    loader_workers: int = 4         # the reference loader's workers (the reference's --num_workers)
    mask_size: int | None = None    # evaluation mask resolution (None: 320, the reference's, at 224 px)
    data_batches: int = 8           # batches read for the data rates and the data-wait share
    sweep_variants: int = 4         # section "sweep": M variants per grid
    sweep_steps: int = 24           # section "sweep": optimiser steps per variant
    out: str | None = None          # JSON folder (None: ./bench-results)
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
        for name, low in (("batch", 1), ("repeats", 1), ("warmup", 0), ("data_batches", 1), ("threads", 1),
                          ("loader_workers", 0), ("mask_size", 1), ("sweep_variants", 2), ("sweep_steps", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise BenchError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BenchError("--device cuda: no CUDA device here; use --device cpu (or auto)")
        if self.cache is not None:
            from spot_fast.bench.fixtures import check_cache, resolve_cache
            train, val = resolve_cache(self.cache)
            check_cache(train, preset(self.preset), split_tokens="stage2" in self.sections)
            if "eval" in self.sections:
                if val is None:
                    raise BenchError(f"--cache {self.cache}: the eval section needs a val cache (masks): pass a "
                                     f"--split both folder, or leave eval out of --sections")
                check_cache(val, preset(self.preset), split_tokens=True)
        if self.reference_repo is not None:
            from spot_fast.bench.reference.client import check_repo
            check_repo(self.reference_repo)

    def resolved(self) -> "BenchConfig":
        dev = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        gpu = dev.startswith("cuda")
        size = preset(self.preset).encoder.image_size
        return replace(self, device=dev, batch=self.batch or (64 if gpu else 8), repeats=self.repeats or (10 if gpu else 3),
                       compile=("on" if gpu else "off") if self.compile == "auto" else self.compile,
                       precision=self.precision if self.precision != "auto" else
                       "bf16" if gpu else "both" if cpu_bf16_native() else "fp32",
                       mask_size=self.mask_size or (320 if size >= 224 else size))

    @property
    def precisions(self) -> tuple[str, ...]:
        """The fast rows' precisions, one row each (after `resolved`)."""
        return ("fp32", "bf16") if self.precision == "both" else (self.precision,)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_bench(cfg: BenchConfig, log=print) -> dict:
    """Run the configured sections; returns the result dict (also saved as JSON when cfg.save)."""
    from spot_fast.threads import configure_threads
    cfg.validate()
    cfg = cfg.resolved()
    model_cfg = preset(cfg.preset)
    from spot_fast.bench.contended import step_work
    threads = configure_threads(cfg.threads, work=step_work(model_cfg, cfg.batch))
    peaks = {p: peak(torch.device(cfg.device), p) for p in dict.fromkeys(("fp32", *cfg.precisions))}
    result = {"config": asdict(cfg), "threads": threads, "git_commit": git_commit(),
              "reference": _reference_note(cfg), "flop_count": flops.__doc__.strip(), "sections": {}}
    with tempfile.TemporaryDirectory(prefix="spot-fast-bench-") as tmp:
        run_sections(cfg, model_cfg, Path(tmp), peaks, result, log)
    if cfg.save:
        from spot_fast.benchinfo import result_path, save_result
        path = result_path("bench_train", cfg.out)
        save_result("bench_train", result, path)
        result["saved"] = str(path)
    return result


def _reference_note(cfg: BenchConfig) -> str:
    if cfg.reference_repo:
        from spot_fast.bench.reference.client import repo_commit
        return (f"the reference checkout's own code ({os.path.abspath(cfg.reference_repo)} @ "
                f"{repo_commit(cfg.reference_repo) or 'unknown commit'}), a timm ViT in place of the hub download")
    return "spot-fast's op-for-op transcription of the reference code (spot_fast.bench.reference)"
