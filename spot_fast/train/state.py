"""Checkpoint state in one object: the model and optimiser state, the resolved SPOTConfig and
TrainConfig, the loop position (`TrainState`), the torch RNG states and the run's identity.
Reading, checksums and the file layout are `spot_fast.runs`'s (below the trainer and evaluation).

Only torch's generators are saved: the loop draws all its randomness from generators seeded by
(seed, step) and the model's initialisation from torch's global one; numpy's and Python's global
generators are drawn from by nothing, so saving them would only record each process's start.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from spot_fast.config import SPOTConfig
from spot_fast.runs import (BEST, CHECKPOINTS, FORMAT, checkpoint_file, load_run, newest_checkpoint,  # noqa: F401
                            read_checkpoint, save_checkpoint, step_checkpoints, step_path)


@dataclass
class TrainState:
    step: int = 0               # optimiser steps done
    epoch: int = 0              # the epoch in progress
    step_in_epoch: int = 0      # batches of `epoch` already used
    best: float = float("inf")  # best validation (else epoch-mean training) loss so far
    best_step: int = -1         # the step it was reached at
    epoch_loss_sum: float = 0.0  # training losses of `epoch` so far (the best value without a val cache)
    epoch_loss_count: int = 0   # how many steps that sum holds


def rng_state() -> dict:
    """The torch generators of the process (CPU, and every CUDA device)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint(model: torch.nn.Module, optimizer, state: TrainState, cfg: SPOTConfig, train_cfg: dict,
               run: dict) -> dict:
    """The checkpoint of the current state; `run`: the run's identity (`folder.run_identity`)."""
    return {"format": FORMAT, "config": cfg.to_dict(), "train_config": train_cfg, "run": run,
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(), "state": dataclasses.asdict(state), "rng": rng_state()}


def save_step(run: Path, ckpt: dict, keep_last: int) -> Path:
    """Write the step checkpoint, then delete all but the newest `keep_last`."""
    path = step_path(run, ckpt["state"]["step"])
    save_checkpoint(ckpt, path)
    for old in step_checkpoints(run)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def save_best(run: Path, ckpt: dict) -> None:
    save_checkpoint(ckpt, Path(run) / CHECKPOINTS / BEST)
