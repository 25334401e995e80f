"""Checkpoint state in one object, written atomically, loadable with `torch.load(weights_only=True)`.

A checkpoint holds only tensors and plain config: the model and optimiser state, the resolved
SPOTConfig and TrainConfig, the loop position (`TrainState`: step, epoch, step inside the epoch,
best value) and every RNG state. Files: `checkpoints/step-00001234.pt` (the last K kept) and
`checkpoints/best.pt`.

    model, cfg = load_run("runs/teacher")           # the newest step checkpoint of a run
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spot_fast.config import SPOTConfig
from spot_fast.model import SPOT
from spot_fast.train.config import TrainError

FORMAT = "spot-fast-checkpoint"
CHECKPOINTS = "checkpoints"
BEST = "best.pt"


@dataclass
class TrainState:
    step: int = 0               # optimiser steps done
    epoch: int = 0              # the epoch in progress
    step_in_epoch: int = 0      # batches of `epoch` already used
    best: float = float("inf")  # best validation (else epoch-mean training) loss so far
    best_step: int = -1         # the step it was reached at
    epoch_loss_sum: float = 0.0  # training losses of `epoch` so far (the best value without a val cache)
    epoch_loss_count: int = 0


def rng_state() -> dict:
    """Every RNG the process owns, as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                      "gauss": gauss},
            "python": list(random.getstate()[1]), "python_version": random.getstate()[0]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((state["python_version"], tuple(state["python"]), None))


def step_path(run: Path, step: int) -> Path:
    return Path(run) / CHECKPOINTS / f"step-{step:08d}.pt"


def step_checkpoints(run: Path) -> list[Path]:
    """The run's step checkpoints, oldest first."""
    folder = Path(run) / CHECKPOINTS
    return sorted(folder.glob("step-*.pt")) if folder.is_dir() else []


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file, fsync, rename: a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def checkpoint(model: torch.nn.Module, optimizer, state: TrainState, cfg: SPOTConfig, train_cfg: dict) -> dict:
    return {"format": FORMAT, "config": cfg.to_dict(), "train_config": train_cfg,
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(), "state": dataclasses.asdict(state), "rng": rng_state()}


def save_step(run: Path, ckpt: dict, keep_last: int) -> Path:
    """Write the step checkpoint, then delete all but the newest `keep_last`."""
    path = step_path(run, ckpt["state"]["step"])
    save_atomic(ckpt, path)
    for old in step_checkpoints(run)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A spot-fast checkpoint (TrainError if the file is not one)."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainError(f"checkpoint {path}: no such file") from None
    except Exception as e:   # noqa: BLE001 - any unreadable file is one message
        raise TrainError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise TrainError(f"{path} is not a spot-fast checkpoint (a reference-format .pth goes through "
                         f"spot_fast.checkpoint.load_reference)")
    return ckpt


def newest_checkpoint(run: str | os.PathLike) -> Path:
    """The newest step checkpoint of a run folder (TrainError if there is none)."""
    found = step_checkpoints(Path(run))
    if not found:
        raise TrainError(f"{run} holds no checkpoint ({CHECKPOINTS}/step-*.pt): is it a spot-fast run folder?")
    return found[-1]


def checkpoint_file(path: str | os.PathLike) -> Path:
    """A run folder's newest step checkpoint, or `path` itself if it is a file."""
    path = Path(path)
    return path if path.is_file() else newest_checkpoint(path)


def load_run(path: str | os.PathLike, device="cpu") -> tuple[SPOT, SPOTConfig]:
    """The model of a run folder (its newest step checkpoint: the final weights of a finished run)
    or of one checkpoint file, in eval mode."""
    ckpt = read_checkpoint(checkpoint_file(path))
    cfg = SPOTConfig.from_dict(ckpt["config"])
    model = SPOT(cfg)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg
