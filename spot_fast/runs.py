"""Run folders and their checkpoints, below both the trainer and evaluation.

A run folder holds `config.json` (what the run is), `log.jsonl`, `checkpoints/step-00001234.pt`
(the last K) and `checkpoints/best.pt`. A checkpoint is a dict of tensors and plain values,
loadable with `torch.load(weights_only=True)`, that carries

- `checksum`: an xxh3-128 hash of everything else in it (tensor bytes included; ~10x faster than
  sha256, which took 1.7 s for a coco-preset checkpoint), verified by every reader, so a damaged
  file is refused instead of evaluated or trained from;
- `run`: the identity of the run that wrote it (`run_identity`: a hash of the config and of the
  caches' manifests, and the encoder weights id), compared with the folder's `config.json` by
  every reader, so a checkpoint of another run dropped into `checkpoints/` is refused.

    model, cfg = load_run("runs/teacher")        # the newest step checkpoint of a run, verified
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

import torch
import xxhash

from spot_fast.config import SPOTConfig
from spot_fast.errors import UserError
from spot_fast.io import load_tensors, save_torch_atomic
from spot_fast.model import SPOT

FORMAT = "spot-fast-checkpoint"
CHECKPOINTS = "checkpoints"
BEST = "best.pt"
CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
CHECKSUM = "checksum"


class RunError(UserError):
    """A run folder or checkpoint that cannot be used: missing, damaged, or of another run."""


# ----------------------------------------------------------------------------- checksums

def _feed(h, obj) -> None:
    """Hash a nested structure of dicts, lists, tensors and plain values, canonically."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)};".encode())
        for x in obj:
            _feed(h, x)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def digest(obj) -> str:
    """"xxh3_128:<hex>" of a nested structure (what a checkpoint's `checksum` holds for the rest of it)."""
    h = xxhash.xxh3_128()
    _feed(h, obj)
    return f"xxh3_128:{h.hexdigest()}"


def json_digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def seal(ckpt: dict) -> dict:
    """The checkpoint with its checksum."""
    body = {k: v for k, v in ckpt.items() if k != CHECKSUM}
    return {**body, CHECKSUM: digest(body)}


# ----------------------------------------------------------------------------- files of a run

def step_path(run: str | os.PathLike, step: int) -> Path:
    return Path(run) / CHECKPOINTS / f"step-{step:08d}.pt"


def step_checkpoints(run: str | os.PathLike) -> list[Path]:
    """The run's step checkpoints, oldest first."""
    folder = Path(run) / CHECKPOINTS
    return sorted(folder.glob("step-*.pt")) if folder.is_dir() else []


def newest_checkpoint(run: str | os.PathLike) -> Path:
    """The newest step checkpoint of a run folder (RunError if there is none)."""
    found = step_checkpoints(Path(run))
    if not found:
        raise RunError(f"{run} holds no checkpoint ({CHECKPOINTS}/step-*.pt): is it a spot-fast run folder?")
    return found[-1]


def checkpoint_file(path: str | os.PathLike) -> Path:
    """A run folder's newest step checkpoint, or `path` itself if it is a file."""
    path = Path(path)
    return path if path.is_file() else newest_checkpoint(path)


def run_folder_of(path: str | os.PathLike) -> Path | None:
    """The run folder of a run folder or of a checkpoint inside one (None for a loose file)."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.parent.name == CHECKPOINTS and (path.parent.parent / CONFIG_FILE).is_file():
        return path.parent.parent
    return None


def read_run_config(run: str | os.PathLike | None) -> dict | None:
    """A run folder's config.json (None if there is none)."""
    if run is None or not (Path(run) / CONFIG_FILE).is_file():
        return None
    file = Path(run) / CONFIG_FILE
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{file} is unreadable ({type(e).__name__}): the run folder is damaged") from None


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(ckpt: dict, path: str | os.PathLike) -> None:
    """Seal (checksum) and write atomically."""
    save_torch_atomic(seal(ckpt), path)


def read_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """A spot-fast checkpoint whose checksum matches its content (RunError otherwise)."""
    path = Path(path)
    ckpt = load_tensors(path, what, RunError, fix="it is not a spot-fast checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise RunError(f"{path} is not a spot-fast checkpoint (a reference-format .pth goes through "
                       f"spot_fast.checkpoint.load_reference)")
    verify_checkpoint(ckpt, path, what)
    return ckpt


def verify_checkpoint(ckpt: dict, path: Path, what: str = "checkpoint") -> None:
    """RunError unless the loaded spot-fast checkpoint matches its checksum."""
    if CHECKSUM not in ckpt:
        raise RunError(f"{what} {path} carries no checksum (written by an older spot-fast): retrain, or load "
                       f"its 'model' tensors yourself with torch.load")
    if digest({k: v for k, v in ckpt.items() if k != CHECKSUM}) != ckpt[CHECKSUM]:
        raise RunError(f"{what} {path} is damaged (its content does not match its checksum): delete it and use "
                       f"the run's previous checkpoint (--resume falls back to it by itself)")


def check_belongs(ckpt: dict, path: Path, config: dict | None) -> None:
    """RunError unless the checkpoint was written by the run whose config.json is `config`."""
    if config is None or "run_id" not in config:
        return
    if ckpt.get("run", {}).get("id") != config["run_id"]:
        raise RunError(f"checkpoint {path} was written by another run than the one its folder's config.json "
                       f"describes (another config, cache or encoder): remove it from {path.parent}")


def read_run_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> tuple[dict, Path, dict | None]:
    """(checkpoint, its file, its run folder's config.json or None): the newest step checkpoint of
    a run folder or the given file, verified and checked to belong to its folder."""
    file = checkpoint_file(path)
    config = read_run_config(run_folder_of(file))
    ckpt = read_checkpoint(file, what)
    check_belongs(ckpt, file, config)
    return ckpt, file, config


def load_run(path: str | os.PathLike, device="cpu") -> tuple[SPOT, SPOTConfig]:
    """The model of a run folder (its newest step checkpoint: the final weights of a finished run)
    or of one checkpoint file, in eval mode."""
    ckpt, _, _ = read_run_checkpoint(path)
    cfg = SPOTConfig.from_dict(ckpt["config"])
    model = SPOT(cfg)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg


def checkpoint_weights(ckpt: dict) -> str | None:
    """The encoder weights id a checkpoint's run trained on (None if unknown)."""
    return ckpt.get("run", {}).get("weights")


def check_weights(have: str | None, want: str | None, what: str, fix: str) -> None:
    """RunError when two known encoder weights ids differ (features of other weights)."""
    if have is not None and want is not None and have != want:
        raise RunError(f"{what} was trained on features of encoder weights {have[:24]}, not {want[:24]}: {fix}")


# ----------------------------------------------------------------------------- one writer per run folder

class RunLock:
    """An exclusive OS lock on `run/.lock` while a process trains into the folder (released by the
    OS when the process dies); a second process is refused, naming the holder's pid."""

    def __init__(self, run: str | os.PathLike):
        self.run = Path(run)
        self.run.mkdir(parents=True, exist_ok=True)
        self.file = open(self.run / LOCK_FILE, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "?"
            self.file.close()
            raise RunError(f"{self.run} is in use: process {holder} is training into it; wait for it to end "
                           f"(or stop it), or choose another --out") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
