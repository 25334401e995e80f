"""One config surface (issue 16) and one validation layer (issue 17): `train` and `sweep` options
are generated from the dataclasses, so a field added to one dataclass appears in both help pages and
is checked the same way from a flag, `--set` and the Python API."""
from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from error_checks import assert_user_error, flat  # noqa: E402

import spot_fast.config as config  # noqa: E402
from spot_fast.fields import ConfigError, setting  # noqa: E402
from spot_fast.train_config import OverrideError, TrainConfig, TrainError, model_config  # noqa: E402

TINY = ["--cache", "no-cache-needed", "--preset", "tiny", "--allow-random-init", "--no-progress"]


def invoke(*args, app=None):
    if app is None:
        from spot_fast.cli.app import app
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def captured(monkeypatch, tmp_path):
    """Replace the trainer by a recorder: the TrainConfig a command line resolves to, nothing trained."""
    import spot_fast.train
    seen = []

    def fake_train(cfg):
        seen.append(cfg)
        return tmp_path / "run"
    monkeypatch.setattr(spot_fast.train, "train", fake_train)
    return seen


@pytest.fixture
def temperature(monkeypatch):
    """SlotAttentionConfig with one more field (a float > 0), as a developer would add it; the app
    is built afresh from the dataclasses."""
    new = dataclasses.make_dataclass(
        "SlotAttentionConfig", [("temperature", float, setting(1.0, above=0, help="softmax temperature"))],
        bases=(config.SlotAttentionConfig,))
    monkeypatch.setattr(config, "SlotAttentionConfig", new)
    from spot_fast.cli.app import make_app
    return make_app()


def test_a_new_field_appears_in_train_and_sweep_help(temperature):
    for command in ("train", "sweep"):
        text = flat(invoke(command, "--help", app=temperature).output)
        assert "--slot-temperature" in text and "softmax temperature (> 0)" in text, text


@pytest.mark.parametrize("args, words", [
    (["--slot-temperature", "0"], ["'--slot-temperature'", "0.0 is out of range", "> 0"]),
    (["--slot-temperature", "abc"], ["'--slot-temperature'", "valid number"]),
])
def test_a_new_field_is_checked_as_a_flag(temperature, tmp_path, captured, args, words):
    res = invoke("train", *TINY, "--out", tmp_path / "r", *args, app=temperature)
    assert res.exit_code == 2 and not captured, res.output
    for w in words:
        assert w in flat(res.output), res.output


@pytest.mark.parametrize("value, words", [("0", ["--set slot_attention.temperature=0", "must be > 0"]),
                                          ("abc", ["--set slot_attention.temperature=abc", "type float"])])
def test_a_new_field_is_checked_by_set(temperature, tmp_path, captured, value, words):
    res = invoke("train", *TINY, "--out", tmp_path / "r", "--set", f"slot_attention.temperature={value}",
                 app=temperature)
    assert_user_error(res, *words)
    assert not captured


def test_a_new_field_reaches_the_model_config_typed(temperature, tmp_path, captured):
    res = invoke("train", *TINY, "--out", tmp_path / "r", "--slot-temperature", "2.5", "--slots", "5",
                 app=temperature)
    assert res.exit_code == 0, res.output
    cfg = model_config(captured[0])
    assert cfg.slot_attention.temperature == 2.5
    assert captured[0].overrides["slot_attention.num_slots"] == 5           # an int from start to end
    assert type(captured[0].overrides["slot_attention.num_slots"]) is int


def test_every_command_has_the_same_model_flags_and_help_renders_brackets():
    train, sweep = (flat(invoke(c, "--help").output) for c in ("train", "sweep"))
    for flag in ("--slots", "--iterations", "--truncate", "--init", "--decoder", "--train-orders", "--ce-weight",
                 "--threads", "--optim-clip", "--optim-warmup-steps", "--decoder-num-heads"):
        assert flag in train and flag in sweep, flag
    assert "[variants.NAME]" in sweep and "[base]" in sweep
    assert "demo" in train.split("--preset", 1)[1][:200]


@pytest.mark.parametrize("args, words", [
    (["--set", "optim.clip=0"], ["--set optim.clip=0", "clip must be > 0"]),
    (["--set", "optim.clip=-0.5"], ["--set optim.clip=-0.5", "clip must be > 0"]),
    (["--set", "optim.warmup_steps=-1"], ["optim.warmup_steps=-1", "must be >= 0"]),
    (["--set", "optim.lr_min=1", "--lr", "0.001"], ["optim.lr_min=1", "lr_min must be <= lr"]),
    (["--set", "optim.epochs=0"], ["optim.epochs=0", "must be >= 1"]),
    (["--set", "optim.lr=nan"], ["optim.lr=nan", "must be finite"]),
    (["--lr", "nan"], ["--lr", "must be finite"]),
    (["--lr", "inf"], ["--lr", "must be finite"]),
    (["--set", "slot_attention.num_heads=3"], ["slot_attention.num_heads=3", "must divide slot_size 16"]),
    (["--decoder-num-heads", "3"], ["--decoder-num-heads 3", "must divide the feature width 32"]),
    (["--teacher", "runs/x"], ["--teacher is for stage 2", "--stage 2"]),
    (["--device", "cuda:7"], ["--device cuda:7", "--device cpu"]),
    (["--device", "foo"], ["--device foo", "cpu, cuda or cuda:N"]),
    (["--seed", str(2**64)], ["--seed", "<= 9223372036854775807"]),
    (["--truncate", "half"], ["--truncate must be one of bi-level, fixed-point, none, got 'half'"]),
    (["--stage", "3"], ["--stage must be 1 or 2, got 3"]),
])
def test_bad_values_are_one_line_before_anything_is_built(tmp_path, captured, args, words):
    res = invoke("train", *TINY, "--out", tmp_path / "r", *args)
    if res.exit_code == 2 and "error:" not in res.output:      # typer's range panel for numeric flags
        assert all(w.split()[0] in flat(res.output) for w in words), res.output
    else:
        assert_user_error(res, *words)
    assert not captured and not (tmp_path / "r").exists()


def test_cuda_without_a_gpu_is_refused_on_train_and_eval(tmp_path, captured):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_user_error(invoke("train", *TINY, "--out", tmp_path / "r", "--device", "cuda"), "--device cuda",
                      "no CUDA device")
    assert_user_error(invoke("eval", tmp_path / "run", "--cache", tmp_path, "--device", "cuda"), "--device cuda")


def test_the_python_api_names_arguments_not_flags():
    with pytest.raises(TrainError, match=r"^teacher is for stage 2 .* stage=2$"):
        TrainConfig(cache="c", teacher="t").validate()
    with pytest.raises(OverrideError, match=r"overrides=\{'optim.clip': 0\}: optim clip must be > 0"):
        TrainConfig(cache="c", overrides={"optim.clip": 0}).validate()
    with pytest.raises(TrainError, match=r"^lr must be finite"):
        TrainConfig(cache="c", lr=float("nan")).validate()
    with pytest.raises(ConfigError, match="num_slots must be >= 1, got 0"):
        config.SlotAttentionConfig(num_slots=0)
    with pytest.raises(ConfigError, match="warmup_steps must be >= 0"):
        config.OptimConfig(warmup_steps=-1)


def test_set_wins_over_a_flag_and_says_so(tmp_path, captured):
    res = invoke("train", *TINY, "--out", tmp_path / "r", "--slots", "5", "--set", "slot_attention.num_slots=6",
                 "--lr", "0.01", "--set", "optim.lr=0.02")
    assert res.exit_code == 0, res.output
    cfg = model_config(captured[0])
    assert cfg.slot_attention.num_slots == 6 and cfg.optim.lr == 0.02
    assert "--set slot_attention.num_slots=6 replaces --slots 5" in res.output
    assert "--set optim.lr=0.02 replaces --lr 0.01" in res.output
    api = model_config(TrainConfig(cache="c", preset="tiny", lr=0.01, overrides={"optim.lr": "0.02"}))
    assert api.optim.lr == 0.02                         # the same rule in Python


def test_decoder_mlp_flag_implies_the_raster_order(tmp_path, captured):
    assert invoke("train", *TINY, "--out", tmp_path / "r", "--decoder", "mlp").exit_code == 0
    d = model_config(captured[0]).decoder
    assert (d.kind, d.train_orders, d.eval_orders) == ("mlp", "standard", "standard")


@pytest.mark.parametrize("grid", [["slot_attention.num_slots=03,3"], ["optim.lr=1e-3,0.001"],
                                  ["slot_attention.truncate=none,bi-level", "optim.clip=0.3,3e-1"]])
def test_sweep_refuses_variants_that_are_the_same_config(tmp_path, grid):
    args = [a for g in grid for a in ("--grid", g)]
    res = invoke("sweep", *TINY, "--out", tmp_path / "s", "--plan", *args)
    line = assert_user_error(res)
    assert re.search(r"variants '\S+' and '\S+' are the same config", line), line
    assert not (tmp_path / "s").exists()


def test_sweep_takes_the_short_flags_and_threads(tmp_path, monkeypatch):
    import spot_fast.sweep.run as run
    seen = []
    monkeypatch.setattr(run, "plan", lambda scfg: seen.append(scfg) or "planned")
    res = invoke("sweep", *TINY, "--out", tmp_path / "s", "--plan", "--slots", "4", "--threads", "1",
                 "--grid", "optim.lr=1e-3,2e-3")
    assert res.exit_code == 0, res.output
    assert seen[0].train.overrides["slot_attention.num_slots"] == 4 and seen[0].train.threads == 1


def test_every_config_field_has_help_and_a_checked_type():
    from spot_fast.fields import field_comments, type_hints
    for cls in (config.EncoderConfig, config.SlotAttentionConfig, config.DecoderConfig, config.OptimConfig,
                TrainConfig):
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            assert comments.get(f.name), f"{cls.__name__}.{f.name} has no comment"
            assert f.name in type_hints(cls)


def test_dataset_names_are_those_open_source_takes():
    from spot_fast.data import DATASET_NAMES
    from spot_fast.data.sources import SOURCES
    assert tuple(SOURCES) == DATASET_NAMES


@pytest.mark.parametrize("sets, words", [
    (["stage=2"], ["an override cannot set the stage", "--stage 2"]),
    (["slot_attention.num_iterations=0"], ["num_iterations=0", "must be >= 1"]),
    (["slot_attention.num_slots=2.5"], ["num_slots=2.5", "type int"]),
    (["optim.final_ce_weight=-1"], ["final_ce_weight=-1", "must be >= 0"]),
    (["encoder.patch_size=0"], ["encoder.patch_size=0", "must be >= 1"]),
    (["decoder.eval_orders=spiral"], ["decoder.eval_orders=spiral", "must be one of standard, random, all"]),
])
def test_set_values_are_checked_by_their_field(tmp_path, captured, sets, words):
    res = invoke("train", *TINY, "--out", tmp_path / "r", *[a for s in sets for a in ("--set", s)])
    assert_user_error(res, *words)
    assert not captured


def test_threads_reaches_the_config_and_torch(tmp_path, captured):
    import torch
    before = torch.get_num_threads()
    try:
        assert invoke("train", *TINY, "--out", tmp_path / "r", "--threads", "1").exit_code == 0
        assert captured[0].threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_command_line_builds_its_options_without_loading_the_trainer():
    """TrainConfig sits below the trainer: `spot-fast --help` does not import the model, kernels or
    cache readers to list the train options."""
    import subprocess
    code = ("import sys, spot_fast.cli.app; "
            "print(sorted(m for m in sys.modules if m.split('.')[:2] == ['spot_fast', 'train']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


@pytest.fixture
def bench_spin(monkeypatch):
    """BenchConfig with one more field (an int >= 1), as a developer would add it; `bench` is
    built afresh from it, and the bench's run replaced by a recorder of the config it gets."""
    import spot_fast.bench
    import spot_fast.bench.config as bench_config
    new = dataclasses.make_dataclass(
        "BenchConfig", [("spin", int, setting(3, min=1, help="busy neighbours' spin count"))],
        bases=(bench_config.BenchConfig,))
    monkeypatch.setattr(bench_config, "BenchConfig", new)
    seen = []
    monkeypatch.setattr(spot_fast.bench, "run_bench", lambda cfg, log: seen.append(cfg) or {})
    monkeypatch.setattr(spot_fast.bench, "format_table", lambda result: "table")
    from spot_fast.cli.app import make_app
    return make_app(), seen


def test_a_new_bench_field_appears_in_bench_help_checked_and_from_the_flag(bench_spin, tmp_path):
    app, seen = bench_spin
    text = flat(invoke("bench", "--help", app=app).output)
    assert "--spin" in text and "busy neighbours' spin count (>= 1)" in text, text
    res = invoke("bench", "--out", tmp_path, "--spin", "0", app=app)
    assert res.exit_code == 2 and not seen and "'--spin': 0 is out of range" in flat(res.output), res.output
    res = invoke("bench", "--out", tmp_path, "--preset", "tiny", "--sections", "stage1,eval", "--spin", "5",
                 "--data-batches", "2", app=app)
    assert res.exit_code == 0, res.output
    assert seen[0].spin == 5 and seen[0].sections == ("stage1", "eval") and seen[0].data_batches == 2
    assert invoke("bench", "--out", tmp_path, app=app).exit_code == 0 and seen[1].spin == 3   # the field's default
