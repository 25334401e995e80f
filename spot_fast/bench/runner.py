"""`spot-fast bench`: run the sections of a BenchConfig (spot_fast/bench/config.py), one table with
the ratios, JSON into a results folder."""
from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from spot_fast.bench import flops
from spot_fast.bench.config import BenchConfig
from spot_fast.bench.peaks import peak
from spot_fast.bench.sections import run_sections
from spot_fast.config import preset


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_bench(cfg: BenchConfig, log=print) -> dict:
    """Run the configured sections; returns the result dict (also saved as JSON when cfg.save)."""
    from spot_fast.threads import configure_threads, step_work
    cfg.validate()
    cfg = cfg.resolved()
    model_cfg = preset(cfg.preset)
    threads = configure_threads(cfg.threads, work=step_work(model_cfg.encoder, cfg.batch))
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
