"""The trainer end to end on the tiny preset: both stages and the DINOSAUR baseline learn, the
run folder holds what it promises, and every refusal is one message naming the fix."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from spot_fast.cache import open_cache
from spot_fast.checkpoint import export_reference
from spot_fast.train import Trainer, TrainError, load_run, train
from spot_fast.train.state import step_checkpoints
from train_case import tiny_caches, tiny_config, tiny_stage1_run, train_losses

pytestmark = pytest.mark.usefixtures("one_thread")


def fell(run) -> bool:
    """The validation loss (reconstruction MSE on the fixed val images) fell every epoch, by 3 % in all."""
    val = train_losses(run, "val")
    return all(b < a for a, b in zip(val, val[1:])) and val[-1] < 0.97 * val[0]


def cli(*args):
    from spot_fast.cli.app import app
    return CliRunner().invoke(app, [str(a) for a in args])


def test_stage1_learns_and_writes_the_run_folder():
    run = tiny_stage1_run()
    losses = train_losses(run)
    assert len(losses) == 15 and fell(run), train_losses(run, "val")
    config = json.loads((run / "config.json").read_text())
    manifest = tiny_caches().both / "train" / "manifest.json"
    import hashlib
    assert config["data"]["train_manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert config["model"]["encoder"]["image_size"] == 32 and config["train"]["stage"] == 1
    # the last K step checkpoints and best.pt, all plain tensors + config
    names = [p.name for p in step_checkpoints(run)]
    assert names == ["step-00000005.pt", "step-00000010.pt", "step-00000015.pt"]
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["state"]["best_step"] == ckpt["state"]["step"] and set(ckpt["rng"]) == {"torch", "cuda"}
    val = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == "val"]
    assert ckpt["state"]["best"] == min(r["loss"] for r in val)
    model, cfg = load_run(run)
    assert cfg.stage == 1 and not model.training
    assert {"metrics.json", "labels.npz", "masks.png"} <= {p.name for p in (run / "eval").iterdir()}


def test_dinosaur_baseline_through_the_cli(tmp_path):
    caches = tiny_caches()
    res = cli("train", "--cache", caches.both, "--preset", "tiny", "--decoder", "mlp", "--epochs", 6, "--lr", 2e-3,
              "--batch-size", 4, "--out", tmp_path / "mlp", "--allow-random-init", "--no-progress", "--log-every", 1,
              "--eval-batch-size", 4, "--device", "cpu")
    assert res.exit_code == 0, res.output
    model, cfg = load_run(tmp_path / "mlp")
    assert cfg.decoder.kind == "mlp" and cfg.decoder.num_orders == 1
    assert fell(tmp_path / "mlp"), train_losses(tmp_path / "mlp", "val")


def test_stage2_learns_from_a_run_teacher_and_the_same_teacher_exported(tmp_path):
    teacher_run = tiny_stage1_run()
    trainer = Trainer(tiny_config(tmp_path / "s2", stage=2, teacher=str(teacher_run)))
    tail = open_cache(tiny_caches().both / "train", allow_random_init=True).tail_state()
    assert torch.equal(trainer.model.encoder_tail[0].attn.qkv.weight, tail["blocks.2.attn.qkv.weight"])
    assert trainer.teacher.cfg.slot_attention.init == "shared_gaussian" and not trainer.teacher.training
    run = trainer.fit()
    records = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert all(r["ce"] > 0 for r in records) and fell(run), train_losses(run, "val")
    assert load_run(run)[1].stage == 2

    # the same teacher as a reference-format checkpoint gives the same stage-2 losses
    model, _ = load_run(teacher_run)
    torch.save(export_reference(model), tmp_path / "teacher.pth")
    run2 = train(tiny_config(tmp_path / "s2ref", stage=2, teacher=str(tmp_path / "teacher.pth"), epochs=1))
    assert train_losses(run2) == [r["loss"] for r in records[:5]]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "nan", checkpoint_every=2, log_every=100))
    epoch = trainer.data.epoch

    def poisoned(e, start_step=0):
        for i, batch in enumerate(epoch(e, start_step), start=start_step + 1):
            if e * 5 + i == 5:                          # the 5th step of the run
                batch["features"] = batch["features"] * float("nan")
            yield batch
    trainer.data.epoch = poisoned
    with pytest.raises(TrainError, match=r"NaN/inf at step 5\b.*step-00000004\.pt"):
        trainer.fit()
    newest = step_checkpoints(tmp_path / "nan")[-1]
    assert newest.name == "step-00000004.pt"
    ckpt = torch.load(newest, weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("extra, message", [
    (["--set", "slot_attention.num_slot=4"], "did you mean slot_attention.num_slots"),
    (["--set", "slot_attention.num_slots=four"], "expected a value of type int"),
    (["--set", "decoder.kind=rnn"], "decoder kind must be"),
    (["--set", "encoder.image_size=64"], "does not fit the model"),
    (["--precision", "fp16"], "--precision must be one of"),
    (["--train-orders", "spiral"], "--train-orders must be one of random, per_sample, standard, all"),
    (["--slots", "0"], "Invalid value for '--slots'"),
    (["--stage", "2"], "stage 2 needs --teacher"),
])
def test_bad_options_are_one_line(tmp_path, extra, message):
    res = cli("train", "--cache", tiny_caches().both, "--preset", "tiny", "--out", tmp_path / "r",
              "--allow-random-init", "--no-progress", *extra)
    assert res.exit_code in (1, 2) and message in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "r").exists()       # 1: our message, 2: typer's usage error


def test_refusals_name_the_fix(tmp_path):
    caches = tiny_caches()
    with pytest.raises(TrainError, match="random-init encoder"):
        Trainer(tiny_config(tmp_path / "a", allow_random_init=False))
    with pytest.raises(TrainError, match=rf"rebuild it with `spot-fast cache synthetic --root {caches.root} "
                                         rf"--split train .*--split-block 2 --out {caches.nosplit}.split2`"):
        Trainer(tiny_config(tmp_path / "b", cache=None, train_cache=str(caches.nosplit), stage=2,
                            teacher=str(tiny_stage1_run())))
    with pytest.raises(TrainError, match=r"teacher .* does not fit the student .*num_slots 3 vs 4"):
        Trainer(tiny_config(tmp_path / "c", stage=2, teacher=str(tiny_stage1_run()),
                            overrides={"slot_attention.num_slots": "4"}))


def test_resume_refuses_a_changed_config_and_a_fresh_run_refuses_a_used_folder(tmp_path):
    run = train(tiny_config(tmp_path / "r", epochs=1))
    with pytest.raises(TrainError, match=r"changed config: model\.optim\.lr, train\.lr differ"):
        Trainer(tiny_config(run, epochs=1, lr=1e-3, resume=True)).fit()
    with pytest.raises(TrainError, match="already holds checkpoints"):
        Trainer(tiny_config(run, epochs=1)).fit()
    with pytest.raises(TrainError, match="holds no checkpoint to resume"):
        Trainer(tiny_config(tmp_path / "empty", epochs=1, resume=True)).fit()


def test_streaming_webdataset_shards_from_urls(tmp_path):
    wds = tiny_caches().nosplit
    urls = f"file://{wds}/shard-{{00000..00004}}.tar"
    val = str(tiny_caches().both / "val")
    run = train(tiny_config(tmp_path / "stream", cache=None, train_cache=str(wds), val_cache=val, stream=urls,
                            epochs=3, checkpoint_every=3))
    assert len(train_losses(run)) == 3 * 5 and fell(run), train_losses(run, "val")
    with pytest.raises(TrainError, match="gives 2 shard URLs for a wds cache of 5 shards"):
        Trainer(tiny_config(tmp_path / "bad", cache=None, train_cache=str(wds),
                            stream=f"{wds}/shard-{{00000..00001}}.tar"))
