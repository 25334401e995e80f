"""`build_splits` (the CLI's and the demo's build), `resolve_cache` (what `--cache PATH` accepts), and
the `spot-fast cache` command paths that use them: --preset's split block, --threads, `info` on a
--split both folder."""
from __future__ import annotations

import shutil

import pytest
import torch
from typer.testing import CliRunner

from spot_fast.cache import (CacheBuildConfig, CacheError, CustomEncoder, build_splits, open_cache,
                             read_manifest, resolve_cache)
from spot_fast.config import preset
from spot_fast.data.synthetic import SyntheticConfig, write_synthetic
from spot_fast.encoders import FrozenEncoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, SyntheticConfig.at_level("easy", num_train=6, num_val=3, image_size=32))
    return root


def _cfg(data, out, **kw):
    enc = preset("tiny").encoder
    kw = {"random_init": True, **kw}
    return CacheBuildConfig("synthetic", data, out=out, encoder=enc, split_block=enc.split_block,
                            mask_size=32, batch_size=4, num_workers=0, device="cpu", progress=False, **kw)


@pytest.fixture(scope="module")
def both(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("both") / "c"
    build_splits(_cfg(data, out), say=lambda _: None)
    return out


def test_build_splits_builds_both_and_finds_them_again(data, both):
    said = []
    again = build_splits(_cfg(data, both), say=said.append)
    assert set(again) == {"train", "val"} and all(r.result is None for r in again.values())
    assert said == [f"already cached: {both / 'train'}", f"already cached: {both / 'val'}"]
    train, val = read_manifest(both / "train"), read_manifest(both / "val")
    assert (train["split"], val["split"], train["views"], val["views"]) == ("train", "val", 2, 1)
    assert train["layers"]["split_block"] == 2 and val["mask_size"] == 32


def test_build_splits_with_a_custom_encoder_makes_it_once_and_only_when_needed(data, both, tmp_path):
    made = []

    def make():
        made.append(1)
        return FrozenEncoder.create(preset("tiny").encoder, random_init=True, seed=0)
    custom = CustomEncoder("random-init:0", make)
    build_splits(_cfg(data, both, random_init=False), encoder=custom, say=lambda _: None)
    assert made == []                                       # both splits were cached: never made
    out = build_splits(_cfg(data, tmp_path / "c", random_init=False, split="val"), encoder=custom,
                       say=lambda _: None)
    assert made == [1] and out["val"].path == tmp_path / "c"
    a = next(iter(open_cache(both / "val", allow_random_init=True).eval_reader(3)))["features"]
    b = next(iter(open_cache(tmp_path / "c", allow_random_init=True).eval_reader(3)))["features"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)       # the same encoder, the same tokens


def test_build_splits_checks_every_split_before_encoding(data, tmp_path):
    with pytest.raises(CacheError, match="split must be train, val or both"):
        build_splits(_cfg(data, tmp_path / "x", split="test"))
    with pytest.raises(CacheError, match="exclude each other"):
        build_splits(_cfg(data, tmp_path / "x", weights=tmp_path / "w.pt"))
    with pytest.raises(CacheError, match="has no option 'bogus'"):
        build_splits(_cfg(data, tmp_path / "x", source_options={"bogus": 1}))
    assert not (tmp_path / "x").exists()


def test_resolve_cache_one_rule(both, tmp_path):
    assert resolve_cache(both, "train", need_both=True) == both / "train"
    assert resolve_cache(both, "val") == both / "val"
    assert resolve_cache(both / "val", "val") == both / "val"            # a single cache of the split asked for
    with pytest.raises(CacheError, match=r"train cache on its own.*pass it as --train-cache"):
        resolve_cache(both / "train", "train", need_both=True)
    with pytest.raises(CacheError, match=r"train cache on its own.*pass it as train_cache="):
        resolve_cache(both / "train", "train", need_both=True, cli=False)
    with pytest.raises(CacheError, match=r"cache of the train split, not of val.*--train-cache"):
        resolve_cache(both / "train", "val")
    half = tmp_path / "half"
    shutil.copytree(both / "train", half / "train")
    with pytest.raises(CacheError, match=r"holds only a train cache.*--split val"):
        resolve_cache(half, "val")
    with pytest.raises(CacheError, match=r"holds no val cache.*--train-cache"):
        resolve_cache(half, "train", need_both=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="not a spot-fast cache"):
        resolve_cache(tmp_path / "empty", "train")
    with pytest.raises(CacheError, match="does not exist"):
        resolve_cache(tmp_path / "nowhere", "train")


def _cli(*args):
    from spot_fast.cli.app import app
    return CliRunner().invoke(app, ["cache", *map(str, args)])


def test_cli_preset_split_block_threads_and_info_on_both(data, both, tmp_path, monkeypatch):
    import spot_fast.threads
    asked = []
    monkeypatch.setattr(spot_fast.threads, "configure_threads", lambda n=None, **kw: asked.append(n) or 1)
    res = _cli("synthetic", "--root", data, "--preset", "tiny", "--random-init", "--mask-size", 32,
               "--batch-size", 4, "--num-workers", 0, "--device", "cpu", "--no-progress", "--threads", 1,
               "--out", both)
    assert res.exit_code == 0 and res.output.count("already cached") == 2, res.output   # split block 2 from the preset
    assert asked == [1]
    res = _cli("info", both)
    assert res.exit_code == 0 and f"{both / 'train'}" in res.output and f"{both / 'val'}" in res.output, res.output
    for row in ("token bytes per image", "error final tokens", "error split tokens", "tail consistency"):
        assert row in res.output


def test_cli_split_refusals_use_flags(data, tmp_path):
    res = _cli("folder", "--root", data, "--split", "val", "--random-init", "--out", tmp_path / "x")
    assert res.exit_code == 2 and "--split val" in res.output and "split=" not in res.output
