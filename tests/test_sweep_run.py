"""`spot-fast sweep` end to end on the tiny preset and the synthetic cache: a 2x2 grid equals four
separate `spot-fast train` runs, the stacked path equals them too, a SIGKILLed sweep resumes to
the same result (and a variant resumes on its own), stage 2 with a shared teacher, the summary."""
from __future__ import annotations

import csv
import dataclasses
import json
import shlex
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from spot_fast.sweep import run as sweep_run
from spot_fast.sweep.run import Sweep, SweepConfig, sweep
from spot_fast.train import TrainError, train
from spot_fast.train.state import step_checkpoints, step_path
from train_case import sigkill_when_written, tiny_caches, tiny_config, tiny_stage1_run

GRID = ["slot_attention.num_slots=3,4", "optim.lr=4e-4,2e-3"]
NAMES = ["num_slots=3_lr=4e-4", "num_slots=3_lr=2e-3", "num_slots=4_lr=4e-4", "num_slots=4_lr=2e-3"]
OVERRIDES = [{"slot_attention.num_slots": k, "optim.lr": lr} for k in ("3", "4") for lr in ("4e-4", "2e-3")]
EPOCHS, EVERY = 2, 3             # 5 steps per epoch; step checkpoints at 3, 6, 9 fall inside epochs


def records(run: Path) -> list[dict]:
    """The log without its timing fields; eval records keep their metrics."""
    keep = ("kind", "step", "epoch", "loss", "mse", "ce", "lr")
    out = []
    for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()):
        out.append({k: v for k, v in r.items() if k in keep or "/" in k})
    return out


def assert_same_records(a: list[dict], b: list[dict], rel: float = 1e-6) -> None:
    """Same records; every number within `rel` relative (the issue's bar for a sweep vs a run)."""
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float):
                assert abs(x[k] - y[k]) <= rel * max(abs(y[k]), 1e-12), (x["kind"], x["step"], k, x[k], y[k])
            else:
                assert x[k] == y[k]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(step_checkpoints(run)[-1], weights_only=True)["model"]


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)      # as the subprocess (OMP_NUM_THREADS=1): the same GEMM summation order
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory, one_thread) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "grid"
    return sweep(SweepConfig(train=tiny_config(out, epochs=EPOCHS, checkpoint_every=EVERY), grid=GRID))


def test_2x2_grid_equals_four_separate_runs(grid_sweep, tmp_path):
    for name, overrides in zip(NAMES, OVERRIDES):
        alone = train(tiny_config(tmp_path / name, epochs=EPOCHS, checkpoint_every=EVERY, overrides=overrides))
        assert_same_records(records(grid_sweep / name), records(alone))
        a, b = final_weights(grid_sweep / name), final_weights(alone)
        assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in a)
        config = json.loads((grid_sweep / name / "config.json").read_text())
        assert config["model"]["slot_attention"]["num_slots"] == int(overrides["slot_attention.num_slots"])
        assert config["model"]["optim"]["lr"] == float(overrides["optim.lr"])


def test_stacked_groups_equal_the_runs_one_after_another(grid_sweep, tmp_path):
    s = Sweep(SweepConfig(train=tiny_config(tmp_path / "stacked", epochs=EPOCHS, checkpoint_every=EVERY),
                          grid=GRID, stack=True))
    assert [[r.name for r in g] for g in s.groups] == [NAMES[:2], NAMES[2:]]     # one group per slot count
    s.run()
    for name in NAMES:    # fp32: the vmapped matmuls round differently, 10 Adam steps
        assert_same_records(records(tmp_path / "stacked" / name), records(grid_sweep / name), rel=1e-6)


def test_summary_table_and_pictures(grid_sweep):
    md = (grid_sweep / "summary.md").read_text().splitlines()
    assert md[0].startswith("| variant | num_slots | lr | decoder.fg_ari |")
    assert len([line for line in md if line.startswith("| num") or line.startswith("| **")]) == 4
    rows = list(csv.DictReader((grid_sweep / "summary.csv").open()))
    assert [r["variant"] for r in rows] == NAMES and sum(int(r["best"]) for r in rows) == 1
    for r in rows:                       # the table holds exactly what each run folder evaluated
        metrics = json.loads((grid_sweep / r["variant"] / "eval" / "metrics.json").read_text())
        assert float(r["decoder.mbo_i"]) == metrics["decoder"]["mbo_i"]
        assert float(r["slot_attention.fg_ari"]) == metrics["slot_attention"]["fg_ari"]
    best = max(rows, key=lambda r: float(r["decoder.mbo_i"]))
    assert best["best"] == "1" and f"**{best['variant']}** (best)" in "\n".join(md)
    picture = np.asarray(Image.open(grid_sweep / "masks.png"))
    assert picture.shape[0] == (1 + 4 + 1) * 32                  # image, 4 variants, ground truth
    for name in NAMES:
        assert {"metrics.json", "labels.npz", "masks.png"} <= {p.name for p in (grid_sweep / name / "eval").iterdir()}
    manifest = json.loads((grid_sweep / "sweep.json").read_text())
    assert [v["name"] for v in manifest["variants"]] == NAMES
    assert "--set slot_attention.num_slots=4 --set optim.lr=2e-3" in manifest["variants"][3]["command"]


@pytest.mark.slow
def test_sigkilled_sweep_resumes_to_the_same_result(grid_sweep, tmp_path):
    killed = tmp_path / "killed"
    args = ["sweep", "--cache", tiny_caches().both, "--preset", "tiny", "--epochs", EPOCHS, "--batch-size", 4,
            "--checkpoint-every", EVERY, "--log-every", 1, "--eval-batch-size", 4, "--allow-random-init",
            "--device", "cpu", "--out", killed, *sum((["--grid", g] for g in GRID), [])]
    # killed once variants 1 and 2 wrote step 3 (variants 3 and 4 are still behind)
    returncode = sigkill_when_written(args, step_path(killed / NAMES[1], EVERY), timeout=300)
    assert returncode == -signal.SIGKILL
    assert not (killed / "summary.md").exists()

    # one variant resumed on its own: sweep.json's `spot-fast train` command for it, plus --resume
    command = json.loads((killed / "sweep.json").read_text())["variants"][0]["command"]
    res = CliRunner().invoke(_app(), shlex.split(command)[1:] + ["--resume"])
    assert res.exit_code == 0, res.output
    assert_same_records(records(killed / NAMES[0]), records(grid_sweep / NAMES[0]))

    # then the whole sweep: the finished variant waits, the others continue or start afresh
    res = CliRunner().invoke(_app(), [str(a) for a in args + ["--resume"]])
    assert res.exit_code == 0, res.output
    for name in NAMES:
        assert_same_records(records(killed / name), records(grid_sweep / name))
        a, b = final_weights(killed / name), final_weights(grid_sweep / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (killed / "summary.csv").read_text() == (grid_sweep / "summary.csv").read_text()


def _app():
    from spot_fast.cli.app import app
    return app


def test_stage2_sweep_with_a_shared_teacher_equals_separate_runs(tmp_path, one_thread):
    teacher = str(tiny_stage1_run())
    base = tiny_config(tmp_path / "s2", stage=2, teacher=teacher, epochs=1)
    s = Sweep(SweepConfig(train=base, grid=["optim.ce_weight=0.005,0.5"]))
    assert len(s.teachers) == 1 and s.runs[0].trainer.teacher is s.runs[1].trainer.teacher
    s.run()
    for name, w in (("ce_weight=0.005", "0.005"), ("ce_weight=0.5", "0.5")):
        alone = train(dataclasses.replace(base, out=str(tmp_path / name), overrides={"optim.ce_weight": w}))
        assert_same_records(records(tmp_path / "s2" / name), records(alone))
        assert any(r.get("ce", 0) > 0 for r in records(alone))


def test_refusals_are_one_message_and_write_nothing(grid_sweep, tmp_path, monkeypatch):
    def cli(*args):
        return CliRunner().invoke(_app(), ["sweep", "--cache", str(tiny_caches().both), "--preset", "tiny",
                                           "--allow-random-init", "--device", "cpu", "--batch-size", "4",
                                           *map(str, args)])
    res = cli("--out", grid_sweep, *sum((["--grid", g] for g in GRID), []))
    assert res.exit_code == 2 and "already holds a sweep: pass --resume" in res.output, res.output
    res = cli("--out", grid_sweep, "--resume", "--epochs", EPOCHS, "--grid", "slot_attention.num_slots=3,5")
    assert res.exit_code == 2 and "--resume with a changed sweep: grid, variants differ" in res.output, res.output
    res = cli("--out", tmp_path / "a", "--grid", "optim.batch_size=4,8")
    assert res.exit_code == 2 and "optim.batch_size cannot vary inside a sweep" in res.output
    res = cli("--out", tmp_path / "b", "--lr", "1e-3", "--grid", "optim.lr=1e-3,2e-3")
    assert res.exit_code == 2 and "--lr fixes every variant's optim.lr" in res.output
    res = cli("--out", tmp_path / "c", "--stage", "2", "--grid", "optim.ce_weight=0.1,0.2")
    assert res.exit_code == 2 and "stage 2 needs exactly one of --teacher" in res.output
    assert "Traceback" not in res.output
    res = cli("--out", tmp_path / "e", "--stage", "2", "--teachers", tmp_path, "--grid", "optim.ce_weight=0.1,0.2")
    assert res.exit_code == 2 and "no run 'ce_weight=0.1' in it" in res.output, res.output
    res = cli("--out", tmp_path / "f", "--stage", "2", "--teacher", tmp_path / "none",
              "--grid", "optim.ce_weight=0.1,0.2")
    assert res.exit_code == 2 and "no such run folder or checkpoint" in res.output, res.output
    monkeypatch.setattr(sweep_run, "check_fits", _no_room)
    with pytest.raises(TrainError, match="1 of these variants would fit"):
        Sweep(SweepConfig(train=tiny_config(tmp_path / "d"), grid=GRID))
    assert not any((tmp_path / x).exists() for x in "abcdef")


def _no_room(groups, batch_size, device, precision="fp32", stacked=False, teachers=(), free=None):
    from spot_fast.sweep.memory import check_fits, sweep_bytes
    one = sweep_bytes(groups[:1], batch_size, precision, stacked, teachers)
    return check_fits(groups, batch_size, device, precision, stacked, teachers, free=int(1.3 * one))


def test_plan_says_how_many_fit(tmp_path):
    res = CliRunner().invoke(_app(), ["sweep", "--cache", str(tiny_caches().both), "--preset", "tiny",
                                      "--allow-random-init", "--device", "cpu", "--batch-size", "4", "--plan",
                                      "--stack", "--out", str(tmp_path / "p"), *sum((["--grid", g] for g in GRID), [])])
    assert res.exit_code == 0, res.output
    assert "4 variants in 2 stacked groups" in res.output and "4 of 4 variants fit" in res.output
    assert "num_slots=4_lr=2e-3: 41,544 parameters" in res.output and not (tmp_path / "p").exists()


def test_stage2_stacked_with_a_teacher_per_variant(grid_sweep, tmp_path):
    base = tiny_config(tmp_path / "s2", stage=2, epochs=1)
    s = Sweep(SweepConfig(train=base, grid=GRID, teachers=str(grid_sweep), stack=True))
    assert len(s.teachers) == 4 and [len(g) for g in s.groups] == [2, 2]
    s.run()
    for name, overrides in zip(NAMES, OVERRIDES):
        alone = train(dataclasses.replace(base, out=str(tmp_path / name), teacher=str(grid_sweep / name),
                                          overrides=overrides))
        assert_same_records(records(tmp_path / "s2" / name), records(alone))
