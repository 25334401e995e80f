"""`--precision auto`: bf16 on CUDA; on a CPU bf16 only where the CPU multiplies bf16 in hardware,
the step is large, and the committed bf16-vs-fp32 comparison found bf16 landing where fp32 does.
What resolved is printed in the intro line and recorded in config.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_case import tiny_config  # noqa: E402

from spot_fast import precision  # noqa: E402
from spot_fast.precision import BF16_CPU_WORK, resolve_precision  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_a_cpu_takes_bf16_only_for_large_steps_on_native_bf16(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: native)
    assert resolve_precision("auto", CPU, BF16_CPU_WORK - 1) == "fp32"
    assert resolve_precision("auto", CPU, None) == "fp32"
    assert resolve_precision("auto", CPU, BF16_CPU_WORK) == ("bf16" if native else "fp32")
    monkeypatch.setattr(precision, "BF16_LANDS_WITH_FP32", False)     # evidence against: never bf16
    assert resolve_precision("auto", CPU, 10 * BF16_CPU_WORK) == "fp32"


def test_auto_on_cuda_is_bf16_and_explicit_choices_stand():
    assert resolve_precision("auto", CUDA, 1) == "bf16"
    for p in ("bf16", "fp32"):
        assert resolve_precision(p, CPU, 1) == p == resolve_precision(p, CPU, 10 * BF16_CPU_WORK)


def test_the_constant_is_what_the_committed_comparison_found():
    """BF16_LANDS_WITH_FP32 must follow benchmarks/bf16_vs_fp32.py's committed result: >= 8 seeds
    in each precision, every metric within 2 standard errors."""
    result = json.loads((REPO / precision.BF16_EVIDENCE).read_text())
    seeds = {p: {r["seed"] for r in result["rows"] if r["precision"] == p} for p in ("fp32", "bf16")}
    assert min(len(s) for s in seeds.values()) >= 8, seeds
    every = all(c["within_2_se"] for c in result["comparison"].values())
    assert len(result["comparison"]) >= 5
    assert precision.BF16_LANDS_WITH_FP32 == every == result["bf16_lands_where_fp32_does"]


@pytest.mark.usefixtures("one_thread")
def test_the_run_prints_and_records_what_it_computed_with(tmp_path):
    from spot_fast.train import Trainer
    from spot_fast.train.setup import intro
    t = Trainer(tiny_config(tmp_path / "r", max_steps=1))
    line = intro(t.setup, t.steps_per_epoch, 1, t.device)
    assert "fp32" in line and f"{t.setup.threads} thread" in line, line          # tiny: fp32 whatever the CPU
    assert t.config["compute"] == {"device": "cpu", "precision": "fp32", "threads": torch.get_num_threads(),
                                   "threads_tuned": False}                     # tiny: small work, one thread
    t.fit()
    assert json.loads((tmp_path / "r" / "config.json").read_text())["compute"]["precision"] == "fp32"
