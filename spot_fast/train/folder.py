"""The run folder of a training: what it records (`config.json`), who writes into it (a lock),
and what `--resume` checks and repairs before the loop continues.

`--resume` compares what determines the numbers, not how paths are spelled: the resolved model
config, the options that change the numbers, the content of the data (cache manifest hashes,
encoder weights id, the resolved image folder) and the teacher's checksum. So the same run found
by a relative or an absolute path, from another working directory, or after the folder moved,
resumes; a changed one is refused, naming what changed.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
from pathlib import Path

from spot_fast.io import TMP_SUFFIX, write_atomic
from spot_fast.runs import (BEST, CHECKPOINTS, CONFIG_FILE, RunError, check_belongs, json_digest, read_checkpoint,
                            step_checkpoints, step_path)
from spot_fast.train.config import RESUME_FREE, TrainConfig, TrainError, config_diff

# TrainConfig fields compared by content (the data's hashes, the teacher's checksum), not as text,
# and fields that change no number (besides RESUME_FREE: the thread count, where the config has one).
PATH_KEYS = ("out", "cache", "train_cache", "val_cache", "stream", "weights", "teacher")
FREE_KEYS = ("threads",)
DATA_PATHS = ("train_cache", "val_cache")
DAMAGED = ".damaged"


def identity(config: dict) -> dict:
    """The part of a config.json that determines the run's numbers."""
    skip = (*RESUME_FREE, *PATH_KEYS, *FREE_KEYS)
    train = {k: v for k, v in config["train"].items() if k not in skip}
    data = {k: v for k, v in config["data"].items() if k not in DATA_PATHS}
    return {"model": config["model"], "train": train, "data": data, "teacher": config.get("teacher_id"),
            "world_size": config["world_size"]}


def run_config(model: dict, train: dict, data: dict, teacher_id: str | None, world_size: int,
               compute: dict | None = None) -> dict:
    """config.json: the resolved configs, the data, the teacher (`teacher_id`: its checkpoint's checksum,
    or a reference .pth's sha256), `run_id` (a hash of `identity`) and `compute`: what the latest
    process computed with (device, resolved precision, threads; not part of the identity)."""
    config = {"model": model, "train": train, "data": data, "teacher_id": teacher_id, "world_size": world_size}
    return {**config, "run_id": json_digest(identity(config)), "compute": compute or {}}


def checkpoint_identity(config: dict) -> dict:
    """What every checkpoint of the run carries about it (`spot_fast.runs.check_belongs` reads it)."""
    return {"id": config["run_id"], "weights": config["data"].get("weights"),
            "train_manifest": config["data"].get("train_manifest_sha256")}


def check_unchanged(run: Path, new: dict) -> None:
    """TrainError unless the run's config.json describes the same run as `new`."""
    file = run / CONFIG_FILE
    if not file.is_file():
        raise TrainError(f"--resume: {file} is missing, so the run's config is unknown")
    try:
        old = json.loads(file.read_text())
        diff = config_diff(identity(old), identity(new))
    except (json.JSONDecodeError, KeyError, TypeError):
        raise TrainError(f"--resume: {file} is damaged or of an older spot-fast: start a new run with "
                         f"another --out") from None
    if diff:
        raise TrainError(f"--resume with a changed config: {', '.join(diff)} differ from {file}; resume with "
                         f"the run's own settings, or start a new run with another --out")


def remove_temporaries(run: Path) -> None:
    """Half-written files a killed process left behind (`*.tmp`)."""
    for folder in (run, run / CHECKPOINTS):
        if folder.is_dir():
            for tmp in folder.glob(f"*{TMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)


def resume_checkpoint(run: Path, config: dict, say, main: bool = True) -> tuple[dict, Path]:
    """The newest step checkpoint that is intact; a damaged newer one is set aside (renamed
    `*.damaged`, by the `main` rank only) and said. A checkpoint of another run is refused."""
    found = step_checkpoints(run)
    for path in reversed(found):
        try:
            ckpt = read_checkpoint(path)
        except RunError as e:
            older = [p for p in found if p < path]
            if not older:
                raise TrainError(f"--resume: {e}; no older checkpoint is left: start a new run with "
                                 f"another --out") from None
            if main:
                path.rename(path.with_name(path.name + DAMAGED))
                say(f"{path.name} is damaged (set aside as {path.name}{DAMAGED}); resuming from the previous "
                    f"checkpoint, {older[-1].name}")
            continue
        try:
            check_belongs(ckpt, path, config)
        except RunError as e:
            raise TrainError(f"--resume: {e}") from None
        return ckpt, path
    raise TrainError(f"--resume: {run} holds no checkpoint to resume from; drop --resume to start")


def repair_best(run: Path, best_step: int, config: dict, say) -> None:
    """Make best.pt the checkpoint of `best_step` (the resumed state's best), when a kill left it
    stale, half-written or missing (or another run's is there) and that step's checkpoint is kept."""
    best = run / CHECKPOINTS / BEST
    if best_step < 0:
        best.unlink(missing_ok=True)
        return
    try:
        ckpt = read_checkpoint(best)
        check_belongs(ckpt, best, config)
        if ckpt["state"]["step"] == best_step:
            return
    except RunError:
        pass
    source = step_path(run, best_step)
    try:
        read_checkpoint(source)
    except RunError:
        say(f"best.pt could not be repaired: the checkpoint of its step {best_step} is gone or damaged")
        return
    with open(source, "rb") as f:
        write_atomic(best, lambda out: shutil.copyfileobj(f, out))
    say(f"best.pt repaired: it is again the checkpoint of step {best_step}")


def train_command(tcfg: TrainConfig, resume: bool = False) -> str:
    """The `spot-fast train` command of this config (with --resume: the one that continues it)."""
    default = TrainConfig()
    args = ["spot-fast", "train"]
    for f in dataclasses.fields(TrainConfig):
        v = getattr(tcfg, f.name)
        if f.name == "overrides":
            for k, x in v.items():
                args += ["--set", f"{k}={x}"]
        elif v != getattr(default, f.name) and f.name != "resume":
            flag = "--" + f.name.replace("_", "-")
            args += [flag] if v is True else [f"--no-{flag[2:]}"] if v is False else [flag, str(v)]
    return shlex.join(args + (["--resume"] if resume else []))


def interrupted_message(run: Path, tcfg: TrainConfig, step: int, total: int) -> str:
    """What an interrupted run kept, and the command that continues (or restarts) it."""
    kept = step_checkpoints(run)
    what = (f"checkpoints up to step {int(kept[-1].stem.split('-')[1])} of {total} are kept" if kept
            else "no checkpoint was written yet")
    return (f"interrupted at step {step}: {what}; {'continue' if kept else 'start again'} with: "
            f"{train_command(tcfg, resume=bool(kept))}")
