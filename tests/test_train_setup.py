"""The trainer's setup as a user meets it: `--cache PATH` follows one rule on train and eval
(`spot_fast.cache.resolve_cache`), a cache's manifest is read once when the trainer opens it, and
`--images` with files that cannot be decoded skips them, says so and records them in the run."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from error_checks import assert_user_error, cli  # noqa: E402

from spot_fast.cache import Cache, CacheError, open_cache  # noqa: E402
from spot_fast.cache.cache import check_fits  # noqa: E402
from spot_fast.config import preset  # noqa: E402
from spot_fast.train import TrainError, Trainer  # noqa: E402
from train_case import tiny_caches, tiny_config, tiny_stage1_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ("--preset", "tiny", "--allow-random-init", "--device", "cpu", "--no-progress")


def test_train_cache_of_one_split_is_named_by_its_own_option(tmp_path):
    train_only = tiny_caches().both / "train"
    res = cli("train", "--cache", train_only, *TINY, "--out", tmp_path / "r")
    assert_user_error(res, f"--cache {train_only} is a train cache on its own", f"--train-cache {train_only}")
    assert not (tmp_path / "r").exists()
    res = cli("sweep", "--cache", train_only, *TINY, "--out", tmp_path / "s", "--plan", "--grid",
              "slot_attention.num_slots=2,3")                           # the sweep opens its cache by the same rule
    assert_user_error(res, f"--train-cache {train_only}")
    with pytest.raises(TrainError, match=f"pass it as train_cache= {train_only}"):     # Python: argument names
        Trainer(tiny_config(tmp_path / "r", cache=str(train_only)))
    half = tmp_path / "half"                                                 # a --split both folder lacking val/
    half.mkdir()
    (half / "train").symlink_to(train_only, target_is_directory=True)
    assert_user_error(cli("train", "--cache", half, *TINY, "--out", tmp_path / "r"),
                      f"--cache {half} holds no val cache", f"--train-cache {half / 'train'}")


def test_eval_takes_a_split_both_folder_and_its_val_cache_alike(tmp_path):
    run, both = tiny_stage1_run(), tiny_caches().both
    said = []
    for i, cache in enumerate((both, both / "val")):
        res = cli("eval", run, "--cache", cache, "--orders", "standard", "--num-pictures", "0", "--device", "cpu",
                  "--out", tmp_path / f"e{i}")
        assert res.exit_code == 0, res.output
        said.append(json.loads((tmp_path / f"e{i}" / "metrics.json").read_text()))
    from spot_fast.evaluate import evaluate_run
    evaluate_run(run, both, orders="standard", num_pictures=0, device="cpu", out=tmp_path / "e2")   # Python too
    assert said[0] == said[1] == json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert_user_error(cli("eval", run, "--cache", tmp_path / "nowhere", "--device", "cpu"),
                      f"no cache at {tmp_path / 'nowhere'}")


def test_the_trainer_reads_each_manifest_once(tmp_path, monkeypatch):
    import spot_fast.cache.store as store
    reads = Counter()
    real = store.read_manifest

    def counted(path):
        reads[Path(path).name] += 1
        return real(path)
    monkeypatch.setattr(store, "read_manifest", counted)
    Trainer(tiny_config(tmp_path / "r"))
    assert reads == {"train": 1, "val": 1}, reads


def test_check_fits_refuses_what_open_cache_refuses_without_reading_again():
    path = tiny_caches().both / "train"
    cache = Cache(path)
    cache.manifest = {**cache.manifest, "random_init": True}      # what check_fits sees is the manifest it holds
    with pytest.raises(CacheError, match="allow_random_init=True"):
        check_fits(cache, preset("tiny"))
    other = preset("tiny").encoder.__class__(name="custom", image_size=64, patch_size=8, embed_dim=32, depth=4,
                                             num_heads=2)
    for call in (lambda: open_cache(path, expect=other, allow_random_init=True),
                 lambda: check_fits(Cache(path), other, allow_random_init=True)):
        with pytest.raises(CacheError, match=r"does not fit the model \(image_size differ\)"):
            call()
    assert check_fits(cache, preset("tiny"), allow_random_init=True) is cache


def write_jpeg(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def test_images_that_cannot_be_decoded_are_skipped_said_and_recorded(tmp_path):
    root = tmp_path / "photos"
    (root / "b").mkdir(parents=True)
    for i in range(6):
        write_jpeg(root / ("b" if i % 2 else ".") / f"img{i}.jpg", i)
    good = (root / "img0.jpg").read_bytes()
    (root / "b" / "broken.jpg").write_bytes(good[: len(good) // 3])     # a JPEG cut short, as a failed copy leaves it
    (root / "notes.png").write_bytes(b"not an image at all")
    out = tmp_path / "r"
    res = cli("train", "--images", root, "--dataset", "folder", "--weights", "random-init", *TINY, "--epochs", "1",
              "--batch-size", "2", "--out", out)
    assert res.exit_code == 0, res.output
    intro = next(line for line in res.output.splitlines() if line.startswith("training "))
    assert "6 images" in intro and "skipped 2 of 8 images that cannot be decoded" in intro, intro
    assert "b/broken.jpg" in intro and "notes.png" in intro, intro
    recorded = json.loads((out / "config.json").read_text())["data"]
    assert recorded["train_samples"] == 6
    assert sorted(Path(s["path"]).name for s in recorded["skipped_images"]) == ["broken.jpg", "notes.png"]
    assert all(s["reason"] for s in recorded["skipped_images"])


def test_stage_2_advice_without_a_runnable_command_still_names_what_to_add(tmp_path):
    from spot_fast.train.config import TrainConfig
    from spot_fast.train.setup import no_split_tokens
    manifest = json.loads((tiny_caches().nosplit / "manifest.json").read_text())
    manifest["weights"] = "3f" * 32                   # a weights file: only its sha256 is recorded, not its path
    path = tmp_path / "c" / "train"
    for tcfg, use in ((TrainConfig(cache=str(tmp_path / "c")), f"cache='{tmp_path / 'c'}.split2'"),
                      (TrainConfig(train_cache=str(path)), f"train_cache='{path}.split2'")):
        message = str(no_split_tokens(tcfg, manifest, path, 2))
        assert "`" not in message and "--split-block 2 --out" in message and message.endswith(use), message
