"""Never lose work: a run killed by a real SIGKILL and resumed with --resume ends with exactly the
losses and weights of the uninterrupted run (bit-identical on CPU)."""
from __future__ import annotations

import json
import signal

import pytest
import torch

from spot_fast.train import train
from spot_fast.train.state import step_checkpoints, step_path
from train_case import sigkill_when_written, tiny_caches, tiny_config

EPOCHS, STEPS_PER_EPOCH, EVERY = 8, 5, 7     # checkpoints at steps 7, 14, ... fall inside epochs


def records(run) -> list[dict]:
    """The log without its timing fields."""
    keep = ("kind", "step", "epoch", "loss", "mse", "lr")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())]


def final_weights(run) -> dict[str, torch.Tensor]:
    return torch.load(step_checkpoints(run)[-1], weights_only=True)["model"]


@pytest.mark.slow
def test_sigkill_then_resume_equals_the_uninterrupted_run(tmp_path, one_thread):
    killed = tmp_path / "killed"
    args = ["train", "--cache", tiny_caches().both, "--preset", "tiny", "--epochs", EPOCHS, "--batch-size", 4,
            "--checkpoint-every", EVERY, "--log-every", 1, "--eval-batch-size", 4, "--allow-random-init",
            "--no-progress", "--device", "cpu", "--out", killed]
    returncode = sigkill_when_written(args, step_path(killed, EVERY), timeout=180)
    assert returncode == -signal.SIGKILL
    kept = step_checkpoints(killed)
    assert kept and int(kept[-1].stem.split("-")[1]) < EPOCHS * STEPS_PER_EPOCH, "the run finished before the kill"
    logged = records(killed)[-1]["step"]

    resumed = train(tiny_config(killed, epochs=EPOCHS, checkpoint_every=EVERY, resume=True))
    full = train(tiny_config(tmp_path / "full", epochs=EPOCHS, checkpoint_every=EVERY))

    assert records(resumed) == records(full), f"killed after step {logged}, resumed from {kept[-1].name}"
    a, b = final_weights(resumed), final_weights(full)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
