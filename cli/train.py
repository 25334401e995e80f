"""`spot-fast train`: parse and validate the options, then call `spot_fast.train.train`.

    spot-fast train --stage 1 --cache CACHE --preset coco --out runs/teacher
    spot-fast train --stage 2 --cache CACHE --teacher runs/teacher --out runs/spot
    spot-fast train --cache CACHE --decoder mlp --set slot_attention.num_slots=6 --out runs/dinosaur
    torchrun --nproc-per-node 8 -m spot_fast.cli.app train --cache CACHE --out runs/teacher
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer

# Short ablation flags -> the SPOTConfig fields they set.
SHORT_FLAGS = {"train_orders": "decoder.train_orders", "slots": "slot_attention.num_slots",
               "iterations": "slot_attention.num_iterations", "truncate": "slot_attention.truncate",
               "init": "slot_attention.init", "ce_weight": "optim.ce_weight"}


@contextlib.contextmanager
def user_errors():
    """Errors a user can cause -> one line on stderr and exit code 1, never a traceback."""
    from spot_fast.cache import CacheError
    from spot_fast.checkpoint import CheckpointMismatch
    from spot_fast.data.base import DatasetError
    from spot_fast.encoders import WeightsNotFound
    from spot_fast.train.config import TrainError
    try:
        yield
    except (TrainError, CacheError, DatasetError, WeightsNotFound, CheckpointMismatch) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)


def parse_sets(items: list[str]) -> dict[str, str]:
    """["a.b=v", ...] -> {"a.b": "v"} (the values are type-checked against the config later)."""
    from spot_fast.train.config import TrainError
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TrainError(f"--set {item!r}: write it as FIELD=VALUE, e.g. --set slot_attention.num_slots=6")
        out[key.strip()] = value.strip()
    return out


def ablation_overrides(decoder: str | None, short: dict[str, object]) -> dict[str, str]:
    """The short flags as --set overrides; `--decoder mlp` is the DINOSAUR baseline (raster order only)."""
    from spot_fast.train.config import TrainError
    out = {SHORT_FLAGS[k]: str(v) for k, v in short.items() if v is not None}
    if decoder is not None:
        if decoder not in ("mlp", "transformer"):
            raise TrainError(f"--decoder must be mlp or transformer, got {decoder!r}")
        out["decoder.kind"] = decoder
        if decoder == "mlp":
            out.setdefault("decoder.train_orders", "standard")
            out["decoder.eval_orders"] = "standard"
    return out


def train(
    stage: int = typer.Option(1, help="1: slot attention + decoder; 2: self-training from a stage-1 teacher."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder of a `--split both` build (train/ and val/)."),
    train_cache: Optional[Path] = typer.Option(None, help="Train cache (instead of --cache)."),
    val_cache: Optional[Path] = typer.Option(None, help="Val cache (default: CACHE/val when present)."),
    images: Optional[Path] = typer.Option(None, help="Dataset root: run the frozen encoder on the fly."),
    dataset: str = typer.Option("coco", help="Dataset of --images: coco, voc, movi, folder, synthetic."),
    weights: Optional[str] = typer.Option(None, help="--images: encoder weights file (default: the local "
                                          "HF / torch-hub cache; random-init with --allow-random-init)."),
    out: Path = typer.Option(Path("runs/spot"), help="Run folder."),
    preset: str = typer.Option("coco", help="Model and optimiser defaults: coco, voc, movi-c, movi-e, tiny."),
    set_: list[str] = typer.Option([], "--set", help="Any config field, FIELD=VALUE (repeatable), "
                                   "e.g. slot_attention.num_slots=6."),
    teacher: Optional[str] = typer.Option(None, help="Stage 2: a stage-1 run folder / checkpoint or a "
                                          "reference-format .pth."),
    decoder: Optional[str] = typer.Option(None, help="mlp (the DINOSAUR baseline) | transformer."),
    train_orders: Optional[str] = typer.Option(None, help="random | per_sample | standard | all."),
    slots: Optional[int] = typer.Option(None, min=1, help="Number of slots K."),
    iterations: Optional[int] = typer.Option(None, min=1, help="Slot-attention iterations T."),
    truncate: Optional[str] = typer.Option(None, help="bi-level | fixed-point | none."),
    init: Optional[str] = typer.Option(None, help="shared_gaussian | embedding."),
    ce_weight: Optional[float] = typer.Option(None, min=0.0, help="Stage-2 cross-entropy weight."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Epochs (default: the preset's)."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Batch per rank (default: the preset's)."),
    lr: Optional[float] = typer.Option(None, min=0.0, help="Peak learning rate (default: the preset's)."),
    seed: int = typer.Option(0, min=0, help="Seed of the data order, slot noise and patch orders."),
    precision: str = typer.Option("auto", help="auto (bf16 on CUDA) | bf16 | fp32 (also turns TF32 off)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    log_every: int = typer.Option(50, min=1, help="Steps between log lines."),
    checkpoint_every: int = typer.Option(0, min=0, help="Steps between checkpoints (0: every epoch)."),
    keep_last: int = typer.Option(3, min=1, help="Step checkpoints kept (plus best.pt)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest checkpoint."),
    allow_random_init: bool = typer.Option(False, "--allow-random-init", help="Accept a random-init cache "
                                           "or encoder (tests and the demo)."),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | cuda:N (default: cuda:LOCAL_RANK if present)."),
    drop_last: bool = typer.Option(True, help="Drop the last short batch of every epoch."),
    max_steps: int = typer.Option(0, min=0, help="Stop after this many steps (0: all epochs)."),
    eval_batch_size: int = typer.Option(64, min=1, help="Batch of the validation passes."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
):
    """Train SPOT stage 1 or 2 from a feature cache (or from images), resumable, on one GPU or many."""
    from spot_fast.train import TrainConfig, train as run_training
    with user_errors():
        short = dict(train_orders=train_orders, slots=slots, iterations=iterations, truncate=truncate, init=init,
                     ce_weight=ce_weight)
        overrides = {**ablation_overrides(decoder, short), **parse_sets(set_)}
        cfg = TrainConfig(stage=stage, cache=_str(cache), train_cache=_str(train_cache), val_cache=_str(val_cache),
                          images=_str(images), dataset=dataset, weights=weights, out=str(out), preset=preset,
                          overrides=overrides, teacher=teacher, epochs=epochs, batch_size=batch_size, lr=lr,
                          seed=seed, precision=precision, compile=compile, log_every=log_every,
                          checkpoint_every=checkpoint_every, keep_last=keep_last, resume=resume,
                          allow_random_init=allow_random_init, device=device, drop_last=drop_last,
                          max_steps=max_steps, eval_batch_size=eval_batch_size, progress=progress)
        run = run_training(cfg)
    typer.echo(f"run finished: {run}")


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
