"""End to end through the CLI on a generated synthetic COCO-format dataset (real sources, real JPEGs)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from cache_fakes import tiny_encoder  # noqa: E402

from spot_fast.cache import open_cache  # noqa: E402
from spot_fast.data.sources import open_source  # noqa: E402
from spot_fast.data.synthetic import SyntheticConfig, write_synthetic  # noqa: E402

TINY = ["--preset", "tiny", "--random-init", "--chunk-images", "4", "--mask-size", "16", "--num-workers", "0",
        "--batch-size", "3", "--no-progress"]


def cli(*args):
    from spot_fast.cli.app import app
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root, SyntheticConfig(num_train=6, num_val=5, image_size=40))
    victim = sorted((root / "train2017").iterdir())[2]
    victim.write_bytes(b"not a jpeg")            # a corrupt image: skipped and listed
    return root, victim


def test_cli_builds_both_splits_and_reruns_as_already_cached(dataset, tmp_path):
    root, victim = dataset
    out = tmp_path / "cache"
    res = cli("cache", "synthetic", "--root", root, "--split", "both", "--split-block", "2", "--out", out, *TINY)
    assert res.exit_code == 0, res.output
    assert "skipped 1" in res.output and victim.name in res.output

    train = open_cache(out / "train", allow_random_init=True)
    assert train.manifest["counts"] == {"source_images": 6, "images": 5, "skipped": 1, "shards": 2}
    assert train.manifest["skipped"][0]["path"].endswith(victim.name)
    assert train.manifest["views_spec"]["views"] == ["original", "hflip"]
    # the flipped view's stored tokens are the encoder's tokens of the flipped image
    source = open_source("synthetic", root, "train", image_size=32, mask_size=16)
    enc = tiny_encoder()
    shard = train.read_shard(0)
    for j, i in enumerate(shard.rows.tolist()):
        views = source.train_views(i)
        want = enc(views[0].flip(-1)[None]).final[0]
        torch.testing.assert_close(torch.from_numpy(shard.features[j, 1]).float(), want, atol=2e-3, rtol=2e-3)

    val = open_cache(out / "val", allow_random_init=True)
    vsource = open_source("synthetic", root, "val", image_size=32, mask_size=16)
    for batch in val.eval_reader(2):
        for j, i in enumerate(batch["index"].tolist()):
            s = vsource.val_sample(i)
            assert torch.equal(batch["instance_mask"][j], s.instance_mask) and batch["jpeg"][j] == s.jpeg
            assert batch["image_id"][j] == vsource.image_id(i)

    again = cli("cache", "synthetic", "--root", root, "--split", "both", "--split-block", "2", "--out", out, *TINY)
    assert again.exit_code == 0 and again.output.count("already cached") == 2, again.output
    assert cli("cache", "verify", out / "val").exit_code == 0


def test_cli_dataset_errors_are_one_message(dataset, tmp_path):
    root, _ = dataset
    res = cli("cache", "synthetic", "--root", tmp_path / "missing", "--split", "train", "--out", tmp_path / "o", *TINY)
    assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "o").exists()
    (tmp_path / "file").write_text("")
    res = cli("cache", "synthetic", "--root", root, "--split", "train", "--out", tmp_path / "file" / "x", *TINY)
    assert res.exit_code == 2 and "cannot create the cache directory" in res.output, res.output
