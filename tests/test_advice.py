"""Advice that works as printed (issue 18): each printed command is run here exactly as printed."""
from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from error_checks import cli  # noqa: E402

from spot_fast.cache import read_manifest  # noqa: E402
from spot_fast.commands import cache_command  # noqa: E402
from spot_fast.errors import Interrupted  # noqa: E402
from spot_fast.train.folder import interrupted_message  # noqa: E402
from spot_fast.train_config import model_config  # noqa: E402
from spot_fast.data.synthetic import SyntheticConfig, write_synthetic  # noqa: E402


def run_printed(command: str):
    """Run a printed `spot-fast ...` command as the user would paste it."""
    args = shlex.split(command)
    assert args[0] == "spot-fast", command
    return cli(*args[1:])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, SyntheticConfig(num_train=5, num_val=3, image_size=32))
    return root


@pytest.mark.parametrize("split, extra", [("train", []), ("val", ["--mask-size", "16", "--dtype", "fp32"])])
def test_the_rebuild_command_with_split_tokens_runs_and_rebuilds_the_same_cache(data, tmp_path, split, extra):
    first = tmp_path / "c"
    res = cli("cache", "synthetic", "--root", data, "--split", split, "--preset", "tiny", "--random-init",
              "--num-workers", "0", "--no-progress", "--split-block", "0", *extra, "--out", first)
    assert res.exit_code == 0, res.output
    old = read_manifest(first)
    command = cache_command(old, tmp_path / "c-split2", preset="tiny", split_block=2)
    assert "--preset tiny" in command and "--random-init" in command and "--split-block 2" in command
    res = run_printed(command + " --num-workers 0 --no-progress")
    assert res.exit_code == 0, (command, res.output)
    new = read_manifest(tmp_path / "c-split2")
    assert new["layers"]["split_block"] == 2
    for key in ("dataset", "root", "split", "encoder", "weights", "dtype", "mask_size", "format", "content"):
        assert new[key] == old[key], key
    from spot_fast.cache import open_cache
    a, b = (open_cache(p, allow_random_init=True) for p in (first, tmp_path / "c-split2"))
    reader = "eval_reader" if split == "val" else "train_reader"
    fa, fb = (next(iter(getattr(c, reader)(5, **({"split_tokens": False} if split == "val" else
                                                  {"seed": 0, "epoch": 0}))))["features"] for c in (a, b))
    assert np.array_equal(fa.numpy(), fb.numpy())


def test_no_command_where_the_manifest_cannot_say_how():
    manifest = {"encoder": {"name": "custom", "image_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 2,
                            "num_heads": 2, "mlp_ratio": 4.0}, "weights": "random-init:0+sincos-position-1.0",
                "dataset": "synthetic", "root": "d", "split": "train", "layers": {"split_block": None}}
    assert cache_command(manifest, "x", split_block=1) is None             # the demo's own encoder
    manifest["weights"] = "3f" * 32                                         # a weights file, path unknown
    assert cache_command(manifest, "x", split_block=1) is None


def test_arguments_are_named_in_the_callers_language():
    from spot_fast.errors import arg, speaking_cli
    python = [arg("allow_random_init", True), arg("drop_last", False), arg("lr", 0.001), arg("teacher"),
              arg("optim.clip", 0.5)]
    assert python == ["allow_random_init=True", "drop_last=False", "lr=0.001", "teacher",
                      "overrides={'optim.clip': 0.5}"]
    with speaking_cli("spot-fast train"):
        assert [arg("allow_random_init", True), arg("drop_last", False), arg("lr", 0.001), arg("teacher"),
                arg("optim.clip", 0.5)] == ["--allow-random-init", "--no-drop-last", "--lr 0.001", "--teacher",
                                            "--set optim.clip=0.5"]


def test_a_data_error_names_the_option_on_the_cli_and_the_argument_in_python(tmp_path):
    from error_checks import assert_user_error

    from spot_fast.data.base import DatasetError
    out = tmp_path / "d"
    out.mkdir()
    (out / "x.txt").write_text("mine")
    with pytest.raises(DatasetError, match=r"^out .* is not empty: pass overwrite=True to replace"):
        write_synthetic(out, SyntheticConfig(num_train=1, num_val=1, image_size=16))
    res = cli("data", "synthetic", "--out", out, "--num-train", "1", "--num-val", "1", "--image-size", "16")
    assert_user_error(res, f"--out {out} is not empty: pass --overwrite to replace")


def test_eval_on_a_train_cache_prints_the_command_that_builds_the_val_cache(data, tmp_path):
    from error_checks import assert_user_error
    train = tmp_path / "c" / "train"
    assert cli("cache", "synthetic", "--root", data, "--split", "train", "--preset", "tiny", "--random-init",
               "--num-workers", "0", "--no-progress", "--out", train).exit_code == 0
    line = assert_user_error(cli("eval", tmp_path / "run", "--cache", train, "--allow-random-init"),
                             f"--cache {train} is a train cache")
    command = line.split("build one with `", 1)[1].rstrip("`")
    res = run_printed(command + " --num-workers 0 --no-progress --mask-size 16")
    assert res.exit_code == 0, (command, res.output)
    val = read_manifest(tmp_path / "c" / "val")
    assert val["split"] == "val" and val["encoder"] == read_manifest(train)["encoder"]


def test_ctrl_c_in_training_says_what_is_kept_and_the_resume_command_runs_as_printed(tmp_path, monkeypatch):
    import spot_fast.train
    seen = []

    def interrupted(cfg):           # the trainer's own Ctrl-C, after two step checkpoints
        seen.append(cfg)
        if cfg.resume:
            return Path(cfg.out)
        (Path(cfg.out) / "checkpoints").mkdir(parents=True)
        for step in (4, 8):
            (Path(cfg.out) / "checkpoints" / f"step-{step:08d}.pt").write_bytes(b"")
        raise Interrupted(interrupted_message(Path(cfg.out), cfg, 9, 20))
    monkeypatch.setattr(spot_fast.train, "train", interrupted)
    out = tmp_path / "run"
    res = cli("train", "--cache", tmp_path / "c", "--preset", "tiny", "--allow-random-init", "--no-progress",
              "--slots", "4", "--set", "optim.clip=0.5", "--lr", "0.002", "--out", out)
    assert res.exit_code == 130, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("interrupted"))
    assert line.startswith("interrupted at step 9: checkpoints up to step 8 of 20 are kept; continue with: "), line
    assert sum("interrupted" in x for x in res.output.splitlines()) == 1, res.output     # said once
    resumed = run_printed(line.split("continue with: ", 1)[1])
    assert resumed.exit_code == 0, resumed.output
    first, again = seen             # the printed command trains the same run, resumed
    assert again.resume and model_config(again) == model_config(first)
    assert dataclasses.replace(again, resume=False, overrides={}) == dataclasses.replace(first, overrides={})
