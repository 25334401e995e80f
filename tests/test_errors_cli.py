"""The `spot-fast` command's own error handling: option values refused where they enter, one-line
errors with exit code 2, --debug, Ctrl-C, --version and the help text (issue 10)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from error_checks import assert_option_refused, assert_user_error, cli, flat  # noqa: E402

from spot_fast.cache import CacheError  # noqa: E402
from spot_fast.data.synthetic import SyntheticConfig, write_synthetic  # noqa: E402

TINY = ["--preset", "tiny", "--random-init", "--num-workers", "0", "--no-progress", "--mask-size", "16"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, SyntheticConfig(num_train=3, num_val=2, image_size=32))
    return root


@pytest.mark.parametrize("option, value, allowed", [
    ("--batch-size", "-4", ">= 1"), ("--batch-size", "0", ">= 1"), ("--chunk-images", "0", ">= 1"),
    ("--num-workers", "-1", ">= 0"), ("--image-size", "0", ">= 1"), ("--mask-size", "-3", ">= 1"),
    ("--split-block", "-1", ">= 0"), ("--seed", "-2", ">= 0"),
])
def test_cache_numeric_options_are_refused_where_they_enter(synth, tmp_path, option, value, allowed):
    out = tmp_path / "c"
    res = cli("cache", "synthetic", "--root", synth, "--out", out, *TINY, option, value)
    assert_option_refused(res, option, value, allowed)
    assert not out.exists()


@pytest.mark.parametrize("option, value, allowed", [
    ("--num-train", "-5", ">= 1"), ("--num-val", "0", ">= 1"), ("--image-size", "8", ">= 16"),
    ("--seed", "-1", ">= 0"),
])
def test_data_numeric_options_are_refused_where_they_enter(tmp_path, option, value, allowed):
    res = cli("data", "synthetic", "--out", tmp_path / "d", option, value)
    assert_option_refused(res, option, value, allowed)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("args, names", [
    (["--device", "gpu"], ["--device", "gpu", "cuda"]),
    (["-o", "crops=2"], ["-o crops=2", "no option"]),
    (["-o", "seed"], ["-o 'seed'", "KEY=VALUE"]),
    (["--dtype", "int4"], ["--dtype", "int4"]),
    (["--compress", "lz4"], ["--compress", "zstd"]),
    (["--image-size", "30"], ["--image-size 30", "patch size 8"]),
    (["--weights", "w.pth"], ["--weights w.pth and --random-init exclude each other"]),
])
def test_bad_option_values_are_one_line(synth, tmp_path, args, names):
    res = cli("cache", "synthetic", "--root", synth, "--out", tmp_path / "c", *TINY, *args)
    assert_user_error(res, *names)
    assert not (tmp_path / "c").exists()


def test_dataset_option_values_are_checked_by_the_source(tmp_path):
    for value in ("0", "abc"):
        res = cli("cache", "voc", "--root", tmp_path, "--split", "train", *TINY, "-o", f"num_crops={value}")
        assert_user_error(res, "num_crops", ">= 1", value)


def test_debug_flag_and_env_show_the_traceback(tmp_path):
    args = ["cache", "info", tmp_path / "nothing"]
    assert_user_error(cli(*args), "no cache at")
    for res in (cli("--debug", *args), cli(*args, env={"SPOT_FAST_DEBUG": "1"})):
        assert isinstance(res.exception, CacheError) and res.exit_code == 1


def test_ctrl_c_during_a_build_says_how_to_resume(synth, tmp_path, monkeypatch):
    import spot_fast.cache.splits

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(spot_fast.cache.splits, "build_cache", interrupted)
    res = cli("cache", "synthetic", "--root", synth, "--split", "train", "--out", tmp_path / "c", *TINY)
    assert res.exit_code == 130 and "Traceback" not in res.output, res.output
    assert "interrupted; finished shards are kept: rerun the same command to resume" in res.output


def test_version():
    from spot_fast import __version__
    for args in (["--version"], ["version"]):
        res = cli(*args)
        assert res.exit_code == 0 and res.output.strip() == f"spot-fast {__version__}", res.output


def test_help_lists_each_datasets_options_and_flags_have_no_bool_metavar():
    voc = flat(cli("cache", "voc", "--help").output)
    assert "voc takes (defaults shown): num_crops=4, seed=0" in voc, voc
    assert "movi takes (defaults shown): frames_per_clip=9, seed=0, num_segs=25" in flat(
        cli("cache", "movi", "--help").output)
    assert "coco takes (defaults shown): none" in flat(cli("cache", "coco", "--help").output)
    for line in cli("cache", "voc", "--help").output.splitlines():
        if "--random-init" in line or "--no-progress" in line:
            assert "<bool>" not in line, line


@pytest.mark.parametrize("args", [(), ("version",), ("train",), ("eval",), ("sweep",), ("bench",), ("demo",),
                                  ("cache",), ("cache", "coco"), ("cache", "info"), ("cache", "verify"),
                                  ("data",), ("data", "synthetic")])
def test_no_help_page_labels_a_flag_bool(args):
    """Flags take no value: neither ours nor --help itself shows typer's `<bool>` label."""
    res = cli(*args, "--help")
    assert res.exit_code == 0 and "--help" in res.output, res.output
    assert "<bool>" not in res.output, res.output
