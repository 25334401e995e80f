"""Checkpoints and run folders are verified (issue 17): a damaged checkpoint is refused by every
reader and skipped by --resume, a checkpoint of another run or other encoder weights is refused,
one process at a time trains into a folder, --resume repairs best.pt and removes temporaries,
compares content instead of path spellings, and is exact in everything it saves."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from spot_fast.evaluate import evaluate_run
from spot_fast.predict import Predictor
from spot_fast.runs import BEST, CHECKPOINTS, RunError, RunLock, load_run, seal, step_checkpoints
from spot_fast.train import Trainer, TrainError, train
from train_case import REPO, run_cli, run_env, tiny_caches, tiny_config, tiny_stage1_run

pytestmark = pytest.mark.usefixtures("one_thread")


def flip_byte(path) -> None:
    """Flip one byte in the middle of the file's largest tensor (a bit rot / a torn write)."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x5A]))


def copy_run(tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(tiny_stage1_run(), dst)
    return dst


def test_a_flipped_byte_is_refused_by_every_reader(tmp_path):
    run = copy_run(tmp_path)
    newest = step_checkpoints(run)[-1]
    flip_byte(newest)
    val = tiny_caches().both / "val"
    for read in (lambda: load_run(run), lambda: evaluate_run(run, val, device="cpu"),
                 lambda: Predictor.from_run(run, device="cpu")):
        with pytest.raises(RunError, match=rf"{newest}.* is damaged .*checksum.*: delete it"):
            read()
    with pytest.raises(TrainError, match=r"damaged"):
        Trainer(tiny_config(tmp_path / "s2", stage=2, teacher=str(run)))


def test_resume_falls_back_past_a_damaged_checkpoint_and_says_so(tmp_path, capsys):
    full = train(tiny_config(tmp_path / "full", epochs=3))
    part = train(tiny_config(tmp_path / "part", epochs=3, max_steps=12, checkpoint_every=3))
    newest = step_checkpoints(part)[-1]
    assert newest.name == "step-00000012.pt"
    flip_byte(newest)
    capsys.readouterr()
    resumed = train(tiny_config(part, epochs=3, checkpoint_every=3, resume=True))
    said = capsys.readouterr().out
    assert "step-00000012.pt is damaged" in said and "resuming from the previous checkpoint, step-00000010.pt" in said
    a, b = load_run(resumed)[0].state_dict(), load_run(full)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    run = copy_run(tmp_path)
    other = train(tiny_config(tmp_path / "other", epochs=1, lr=1e-3))
    foreign = step_checkpoints(other)[-1]
    shutil.copy(foreign, run / CHECKPOINTS / "step-00000099.pt")
    with pytest.raises(RunError, match="written by another run"):
        load_run(run)
    with pytest.raises(RunError, match="written by another run"):
        evaluate_run(run, tiny_caches().both / "val", device="cpu")
    with pytest.raises(TrainError, match="written by another run"):
        Trainer(tiny_config(run, resume=True)).fit()


def _with_weights(run, weights: str) -> None:
    """Make the run's checkpoints say they trained on features of `weights` (as a run on a cache
    built from other weights would)."""
    for path in [*step_checkpoints(run), run / CHECKPOINTS / BEST]:
        ckpt = torch.load(path, weights_only=True)
        ckpt["run"]["weights"] = weights
        torch.save(seal(ckpt), path)


def test_other_encoder_weights_are_refused_even_when_the_shapes_match(tmp_path):
    run = copy_run(tmp_path)
    _with_weights(run, "random-init:1")
    with pytest.raises(TrainError, match=r"teacher .* features of encoder weights random-init:1, not random-init:0"):
        Trainer(tiny_config(tmp_path / "s2", stage=2, teacher=str(run)))
    with pytest.raises(RunError, match=r"run .* features of encoder weights random-init:1, not random-init:0"):
        evaluate_run(run, tiny_caches().both / "val", device="cpu")


def test_a_second_process_is_refused_naming_the_holder_and_a_crash_releases_the_lock(tmp_path):
    run = tmp_path / "r"
    code = f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from spot_fast.runs import RunLock; " \
           f"lock = RunLock({str(run)!r}); print('locked', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], env=run_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TrainError, match=rf"{run} is in use: process {holder.pid} is training into it"):
            train(tiny_config(run, epochs=1))
        assert not step_checkpoints(run)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    RunLock(run).release()          # the OS released the dead holder's lock


def test_resume_repairs_best_and_removes_temporaries(tmp_path):
    run = train(tiny_config(tmp_path / "r", epochs=3, max_steps=12))
    best = run / CHECKPOINTS / BEST
    best_step = torch.load(best, weights_only=True)["state"]["best_step"]
    best.write_bytes(b"half a checkpoint")                     # a kill while best.pt was written
    (run / CHECKPOINTS / "best.pt.tmp").write_bytes(b"x")
    (run / "config.json.tmp").write_bytes(b"x")
    trainer = Trainer(tiny_config(run, epochs=3, resume=True))
    trainer.begin()
    trainer.close()
    assert not list(run.rglob("*.tmp"))
    assert torch.load(best, weights_only=True)["state"]["step"] == best_step
    foreign = torch.load(best, weights_only=True)        # another run's best.pt of the same step
    foreign["run"]["id"], foreign["model"]["decoder.bos"] = "another run", foreign["model"]["decoder.bos"] + 1
    torch.save(seal(foreign), best)
    trainer = Trainer(tiny_config(run, epochs=3, resume=True))
    trainer.begin()
    trainer.close()
    assert torch.equal(torch.load(best, weights_only=True)["model"]["decoder.bos"],
                       torch.load(run / CHECKPOINTS / f"step-{best_step:08d}.pt", weights_only=True)["model"]["decoder.bos"])


def test_resume_is_exact_in_every_saved_tensor_across_processes(tmp_path):
    """The numpy/Python generators were saved from each process's random start: a resumed run's
    last checkpoint then differed from the uninterrupted one. Only torch's generators are saved."""
    part = train(tiny_config(tmp_path / "r", epochs=2, max_steps=7, checkpoint_every=3))
    resumed = train(tiny_config(part, epochs=2, checkpoint_every=3, resume=True))
    res = run_cli("train", "--cache", tiny_caches().both, "--preset", "tiny", "--epochs", 2, "--batch-size", 4,
                  "--checkpoint-every", 3, "--log-every", 1, "--eval-batch-size", 4, "--allow-random-init",
                  "--no-progress", "--device", "cpu", "--out", tmp_path / "full")
    assert res.returncode == 0, res.stderr
    a = torch.load(step_checkpoints(resumed)[-1], weights_only=True)
    b = torch.load(step_checkpoints(tmp_path / "full")[-1], weights_only=True)

    def tensors(obj, prefix=""):
        if isinstance(obj, torch.Tensor):
            return {prefix: obj}
        items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
        return {k: v for key, x in items for k, v in tensors(x, f"{prefix}/{key}").items()}

    ta, tb = tensors({k: v for k, v in a.items() if k != "checksum"}), tensors(b)
    assert ta.keys() == tb.keys() and [k for k in ta if not torch.equal(ta[k], tb[k])] == []


def test_resume_accepts_the_same_run_by_another_path_cwd_or_after_a_move(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train(tiny_config("rel", epochs=2, max_steps=3))                  # a relative --out
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(tmp_path / "rel", moved)
    monkeypatch.chdir(moved.parent)
    run = train(tiny_config(moved, epochs=2, max_steps=6, resume=True))   # absolute, other cwd, moved
    assert step_checkpoints(run)[-1].name == "step-00000006.pt"


@pytest.mark.parametrize("overrides, says", [({"optim.clip": "nan"}, "optim.clip = nan is not a positive number"),
                                            ({"optim.ce_weight": "nan"}, "optim.ce_weight = nan is not a finite")])
def test_nan_from_a_value_that_cannot_train_names_it_not_the_lr(tmp_path, overrides, says):
    stage = 2 if "optim.ce_weight" in overrides else 1
    teacher = str(tiny_stage1_run()) if stage == 2 else None
    with pytest.raises(TrainError) as err:
        train(tiny_config(tmp_path / "r", stage=stage, teacher=teacher, overrides=overrides, epochs=1))
    assert "lower --lr" not in str(err.value) and ("optim." in str(err.value)), str(err.value)
    if "NaN" in str(err.value):           # refused at the loss, not already by the config's validation
        assert says in str(err.value)


def test_random_bytes_as_teacher_say_what_is_wrong_without_torch_advice(tmp_path):
    junk = tmp_path / "teacher.pt"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(TrainError) as err:
        Trainer(tiny_config(tmp_path / "r", stage=2, teacher=str(junk)))
    text = str(err.value)
    assert "not a torch.save file" in text and "weights_only" not in text and "\n" not in text


def test_a_cache_changed_under_the_run_stops_it_cleanly(tmp_path):
    from spot_fast.cache import CacheError
    trainer = Trainer(tiny_config(tmp_path / "r", epochs=2))
    epoch = trainer.data.epoch

    def changed(e, start=0):
        for i, batch in enumerate(epoch(e, start)):
            if e == 1 and i == 2:
                raise CacheError("cache X: shard 3 changed since the run opened it: rerun `spot-fast cache verify`")
            yield batch
    trainer.data.epoch = changed
    with pytest.raises(CacheError, match="shard 3 changed"):
        trainer.fit()
    assert step_checkpoints(tmp_path / "r")[-1].name == "step-00000005.pt"
    RunLock(tmp_path / "r").release()       # the folder was released
    resumed = train(tiny_config(tmp_path / "r", epochs=2, resume=True))
    assert step_checkpoints(resumed)[-1].name == "step-00000010.pt"


def test_config_json_records_the_truth_for_eval_and_predict(tmp_path):
    """A run trained with allow_random_init is accepted by eval and predict without repeating it."""
    run = tiny_stage1_run()
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["random_init"] is True and config["data"]["weights"] == "random-init:0"
    assert evaluate_run(run, tiny_caches().both / "val", device="cpu")["images"] == 6
    Predictor.from_run(run, device="cpu")


def test_small_datasets_get_a_batch_and_warmup_that_fit(tmp_path, capsys, monkeypatch):
    """A preset's batch 64 and 10,000 warm-up steps on 22 images: fitted and said, not refused."""
    import dataclasses

    from spot_fast import config
    tiny = config.PRESETS["tiny"]
    monkeypatch.setitem(config.PRESETS, "tiny", lambda: dataclasses.replace(
        tiny(), optim=dataclasses.replace(tiny().optim, batch_size=64, warmup_steps=10000, epochs=20)))
    run = train(tiny_config(tmp_path / "r", batch_size=None, epochs=None, max_steps=1))
    said = capsys.readouterr().out
    assert "fitted to the small dataset: batch 22" in said and "lr warm-up 2 steps" in said, said
    optim = json.loads((run / "config.json").read_text())["model"]["optim"]
    assert optim["batch_size"] == 22 and optim["warmup_steps"] == 2
    with pytest.raises(TrainError, match="batch size 64"):             # a batch the user chose is kept
        Trainer(tiny_config(tmp_path / "s", batch_size=64))


def test_the_lock_names_this_process_and_is_free_again_once_released(tmp_path):
    lock = RunLock(tmp_path / "r")
    with pytest.raises(RunError, match=f"process {os.getpid()} is training into it"):
        RunLock(tmp_path / "r")
    lock.release()
    RunLock(tmp_path / "r").release()


def test_a_teacher_given_to_stage_1_is_refused_not_ignored(tmp_path):
    with pytest.raises(TrainError, match="teacher is for stage 2"):
        Trainer(tiny_config(tmp_path / "r", teacher=str(tiny_stage1_run())))


def test_the_demo_encoder_is_rebuilt_from_its_weights_id():
    """A run of the demo cache records "random-init:0+sincos-position-1.0"; the predictor's
    encoder is then the demo's, even from a config that says "learned"."""
    from spot_fast.config import preset
    from spot_fast.demo import demo_encoder
    from spot_fast.predict import run_encoder
    cfg = preset("demo")
    learned = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, position="learned",
                                                                    position_scale=0.25))
    want = demo_encoder(cfg.encoder, 0)
    for weights in (None, "random-init"):
        got = run_encoder(learned, want.weights_id, weights)
        assert got.weights_id == want.weights_id
        a, b = got.vit.state_dict(), want.vit.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
