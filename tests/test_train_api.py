"""The Trainer's public per-batch API (what `fit()` is built on and the sweep drives): a loop
written by hand with it, train_step in its three parts, equals `fit()` bit for bit; a reader that
runs short of steps_per_epoch still ends its epochs."""
from __future__ import annotations

import json

import torch

from spot_fast.cache import device_batches
from spot_fast.train import Trainer, train
from spot_fast.train.state import BEST, CHECKPOINTS, step_checkpoints
from train_case import tiny_config

EPOCHS, EVERY = 2, 3        # 5 steps per epoch; step checkpoints at 3, 6, 9 fall inside epochs


def records(run) -> list[dict]:
    """The log without its timing fields."""
    drop = ("img_s", "ms_step", "data_wait")
    lines = (run / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in r.items() if k not in drop} for r in map(json.loads, lines)]


def drive(trainer: Trainer) -> None:
    """fit() spelled out: begin, before_step -> forward_backward -> after_step -> record per batch, finish."""
    trainer.begin()
    try:
        while not trainer.done:
            epoch = trainer.state.epoch
            for batch in device_batches(trainer.data.epoch(epoch, trainer.state.step_in_epoch), trainer.device):
                rnd = trainer.before_step(batch)
                out = trainer.forward_backward(batch, rnd)
                trainer.after_step()
                trainer.record(out, batch)
                if trainer.done or trainer.state.epoch != epoch:
                    break
        trainer.finish()
    finally:
        trainer.close()


def test_a_loop_on_the_public_api_equals_fit(tmp_path, one_thread):
    kw = dict(epochs=EPOCHS, checkpoint_every=EVERY, keep_last=10)
    full = train(tiny_config(tmp_path / "fit", **kw))
    drive(Trainer(tiny_config(tmp_path / "api", **kw)))
    api = tmp_path / "api"
    assert records(api) == records(full)
    assert [p.name for p in step_checkpoints(api)] == [p.name for p in step_checkpoints(full)]
    pairs = [*zip(step_checkpoints(api), step_checkpoints(full)), (api / CHECKPOINTS / BEST, full / CHECKPOINTS / BEST)]
    for a, b in pairs:
        x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
        assert x["state"] == y["state"]
        assert all(torch.equal(x["model"][k], y["model"][k]) for k in y["model"])
    metrics = [json.loads((run / "eval" / "metrics.json").read_text()) for run in (api, full)]
    assert metrics[0] == metrics[1]


def test_a_reader_that_runs_short_still_ends_its_epochs(tmp_path, one_thread):
    trainer = Trainer(tiny_config(tmp_path / "short", epochs=EPOCHS))
    epoch = trainer.data.epoch

    def four_of_five(e, start_step=0):       # the reader ends one batch early every epoch
        for i, batch in enumerate(epoch(e, start_step), start=start_step):
            if i < 4:
                yield batch
    trainer.data.epoch = four_of_five
    run = trainer.fit()
    log = records(run)
    assert [(r["step"], r["epoch"]) for r in log if r["kind"] == "val"] == [(4, 0), (8, 1)]
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, 11))     # 10 steps: epoch 2 is cut
    assert trainer.state.epoch == 2 and trainer.state.step_in_epoch == 2
    assert step_checkpoints(run)[-1].name == "step-00000010.pt"
