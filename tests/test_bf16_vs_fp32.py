"""benchmarks/bf16_vs_fp32.py, the program whose verdict decides `--precision auto` on CPUs: its
statistics against hand-computed figures, its verdict at the 2-standard-error boundary, and one
small run end to end (rows read back from the runs' logs and evaluations)."""
from __future__ import annotations

import importlib.util
import math
import statistics
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bf16_vs_fp32.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bf16_vs_fp32", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module            # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _rows(bench, fp32: list[float], bf16: list[float], key: str) -> list[dict]:
    """Rows where `key` takes the given values and every other metric is the same in both."""
    rows = []
    for precision, values in (("fp32", fp32), ("bf16", bf16)):
        for seed, v in enumerate(values):
            row = {k: 0.5 + seed for k, _ in bench.COLUMNS}
            rows.append({**row, key: v, "precision": precision, "seed": seed})
    return rows


def test_mean_and_standard_error(bench):
    values = [3.0, 7.5, 1.25, 9.0, 4.0]
    mean, se = bench.mean_se(values)
    assert mean == pytest.approx(statistics.fmean(values), rel=1e-15)
    assert se == pytest.approx(statistics.stdev(values) / math.sqrt(5), rel=1e-15)
    assert bench.mean_se([2.0]) == (2.0, 0.0)


def test_verdict_at_two_standard_errors(bench):
    fp32 = [1.0, 2.0, 3.0, 4.0]                    # mean 2.5, se = sqrt(5/3) / 2 = 0.6455
    se = math.sqrt(5 / 3) / 2
    inside = bench.compare(_rows(bench, fp32, [v + 1.9 * se for v in fp32], "decoder/fg_ari"))
    c = inside["decoder/fg_ari"]
    assert c["fp32_mean"] == pytest.approx(2.5) and c["fp32_se"] == pytest.approx(se)
    assert c["gap_in_fp32_se"] == pytest.approx(1.9) and c["gap_in_diff_se"] == pytest.approx(1.9 / math.sqrt(2))
    assert c["paired_diff_mean"] == pytest.approx(1.9 * se) and c["paired_diff_se"] == pytest.approx(0, abs=1e-12)
    assert all(v["within_2_se"] for v in inside.values())
    outside = bench.compare(_rows(bench, fp32, [v - 2.1 * se for v in fp32], "train_mse"))
    assert not outside["train_mse"]["within_2_se"]
    assert all(v["within_2_se"] for k, v in outside.items() if k != "train_mse")
    # a seed that ran in one precision only is left out of both means
    lone = {"precision": "fp32", "seed": 9, **{k: 99.0 for k, _ in bench.COLUMNS}}
    extra = _rows(bench, fp32, fp32, "val_mse") + [lone]
    assert bench.compare(extra)["val_mse"]["fp32_mean"] == pytest.approx(2.5)


def test_small_run_end_to_end(bench, tmp_path, one_thread):
    cfg = bench.Bf16Config(seeds=2, num_train=16, num_val=4, epochs=2, work=str(tmp_path))
    result = bench.run(cfg, say=lambda _: None)
    rows = result["rows"]
    assert [(r["precision"], r["seed"]) for r in rows] == [("fp32", 0), ("bf16", 0), ("fp32", 1), ("bf16", 1)]
    assert all(r["steps"] == 2 * 16 // 8 for r in rows)
    for r in rows:
        assert 0 < r["train_mse"] < 10 and 0 < r["val_mse"] < 10
        assert all((-100 if "fg_ari" in k else 0) <= r[k] <= 100 for k, _ in bench.COLUMNS if "mse" not in k)
    # the two precisions of a seed start from the same model and batches: close, not identical
    assert rows[0]["train_mse"] != rows[1]["train_mse"]
    assert rows[1]["train_mse"] == pytest.approx(rows[0]["train_mse"], rel=0.05)
    assert set(result["comparison"]) == {k for k, _ in bench.COLUMNS}
    assert result["bf16_lands_where_fp32_does"] == all(c["within_2_se"] for c in result["comparison"].values())
