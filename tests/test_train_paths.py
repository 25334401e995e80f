"""Paths a researcher walks between commands (issue 18): printed commands run as printed, Ctrl-C
says what was kept and the command that continues, and a run records the encoder that made its
features so that `Predictor.from_run(run)` rebuilds exactly that encoder from the folder alone."""
from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from spot_fast.cache import open_cache
from spot_fast.predict import Predictor
from spot_fast.runs import load_run, step_checkpoints
from spot_fast.train import Trainer, TrainError, train
from train_case import IMAGE_SIZE, MASK_SIZE, run_cli, tiny_caches, tiny_config, tiny_stage1_run

pytestmark = pytest.mark.usefixtures("one_thread")


def cli_args(command: str) -> list[str]:
    """A printed `spot-fast ...` command as the arguments of the CLI entry point."""
    args = shlex.split(command)
    assert args[0] == "spot-fast", command
    return args[1:]


def test_the_printed_rebuild_command_runs_and_feeds_stage_2(tmp_path):
    caches = tiny_caches()
    nosplit = tmp_path / "nosplit"
    shutil.copytree(caches.nosplit, nosplit)
    with pytest.raises(TrainError) as err:
        Trainer(tiny_config(tmp_path / "s2", cache=None, train_cache=str(nosplit), stage=2,
                            teacher=str(tiny_stage1_run())))
    message = str(err.value)
    command = re.search(r"`(spot-fast cache [^`]*)`", message).group(1)
    res = run_cli(*cli_args(command), timeout=300)
    assert res.returncode == 0, res.stderr
    train_cache = re.search(r"train with train_cache='([^']+)'$", message).group(1)   # Python: argument names
    trainer = Trainer(tiny_config(tmp_path / "s2", cache=None, train_cache=train_cache, stage=2,
                                  teacher=str(tiny_stage1_run())))
    assert trainer.cfg.stage == 2 and len(trainer.data) == 5


def test_ctrl_c_says_what_was_kept_and_the_printed_command_continues_exactly(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "r", epochs=2, checkpoint_every=3)
    trainer = Trainer(cfg)
    epoch = trainer.data.epoch

    def interrupted(e, start=0):
        for i, batch in enumerate(epoch(e, start)):
            if e == 1 and i == 2:
                raise KeyboardInterrupt
            yield batch
    trainer.data.epoch = interrupted
    with pytest.raises(KeyboardInterrupt) as stop:
        trainer.fit()
    said = str(stop.value)
    assert said.startswith("interrupted at step 7: checkpoints up to step 6 of 10 are kept; continue with: "), said
    command = said.split("continue with: ", 1)[1]
    assert command.endswith(" --resume")
    res = run_cli(*cli_args(command))
    assert res.returncode == 0, res.stderr
    full = train(tiny_config(tmp_path / "full", epochs=2, checkpoint_every=3))
    a, b = load_run(tmp_path / "r")[0].state_dict(), load_run(full)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def sincos_caches():
    """Train and val caches of the tiny encoder with a sin-cos position table of scale 0.5 (as the
    demo's encoder): its preset's encoder says "learned"."""
    from spot_fast.cache import CacheSpec, build_cache
    from spot_fast.config import preset
    from spot_fast.data.sources import open_source
    from spot_fast.encoders import FrozenEncoder
    base = Path(tempfile.mkdtemp(prefix="spot-fast-sincos-"))
    enc = dataclasses.replace(preset("tiny").encoder, position="sincos", position_scale=0.5)
    encoder = FrozenEncoder.create(enc, random_init=True, seed=0)
    root = tiny_caches().root
    for split in ("train", "val"):
        source = open_source("synthetic", root, split, image_size=IMAGE_SIZE, mask_size=MASK_SIZE)
        spec = CacheSpec("synthetic", str(root), split, enc, "random-init:0", split_block=2, dtype="fp32",
                         chunk_images=5, mask_size=MASK_SIZE)
        build_cache(source, encoder, spec, base / split, batch_size=8, device="cpu", progress=False)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_the_run_records_the_caches_encoder_and_predicts_with_it(tmp_path, sincos_caches):
    run = train(tiny_config(tmp_path / "r", cache=str(sincos_caches), max_steps=2))
    recorded = json.loads((run / "config.json").read_text())["model"]["encoder"]
    assert (recorded["position"], recorded["position_scale"]) == ("sincos", 0.5)
    predictor = Predictor.from_run(run, device="cpu")          # nothing but the run folder
    val = open_cache(sincos_caches / "val", allow_random_init=True)
    batch = next(iter(val.eval_reader(3)))
    from spot_fast.data.sources import open_source
    source = open_source("synthetic", tiny_caches().root, "val", image_size=IMAGE_SIZE, mask_size=MASK_SIZE)
    images = torch.stack([source.val_sample(int(i)).image for i in batch["index"]])
    features = predictor.encoder(images).final
    err = (features - batch["features"]).abs().max().item()
    assert err <= 1e-5 * max(1.0, batch["features"].abs().max().item()), err
    assert step_checkpoints(run)


def test_the_intro_line_names_what_trains(tmp_path):
    from spot_fast.train.setup import intro
    mlp = {"decoder.kind": "mlp", "decoder.train_orders": "standard", "decoder.eval_orders": "standard"}
    for overrides, name in (({}, "training SPOT stage 1:"), (mlp, "training DINOSAUR (the MLP-decoder baseline):")):
        t = Trainer(tiny_config(tmp_path / "r", overrides=overrides))
        assert intro(t.setup, t.steps_per_epoch, 1, t.device).startswith(name)


def test_a_split_both_cache_without_split_tokens_gets_a_command_for_both_splits(tmp_path):
    from spot_fast.cache import CacheBuildConfig, build_splits
    from spot_fast.config import preset
    both = tmp_path / "both"      # a preset's CLI build carries its split block: build one without, in Python
    encoder = dataclasses.replace(preset("tiny").encoder, image_size=int(IMAGE_SIZE))
    build_splits(CacheBuildConfig("synthetic", tiny_caches().root, split="both", out=both, encoder=encoder,
                                  random_init=True, dtype="fp32", mask_size=int(MASK_SIZE), num_workers=0,
                                  progress=False))
    assert open_cache(both / "train", allow_random_init=True).manifest["layers"]["split_block"] is None
    with pytest.raises(TrainError) as err:
        Trainer(tiny_config(tmp_path / "s2", cache=str(both), stage=2, teacher=str(tiny_stage1_run())))
    message = str(err.value)
    command = re.search(r"`(spot-fast cache [^`]*)`", message).group(1)
    res = run_cli(*cli_args(command), timeout=300)
    assert res.returncode == 0, res.stderr
    cache = re.search(r"train with cache='([^']+)'$", message).group(1)
    trainer = Trainer(tiny_config(tmp_path / "s2", cache=cache, stage=2, teacher=str(tiny_stage1_run())))
    assert trainer.cfg.stage == 2 and trainer.val_cache is not None
