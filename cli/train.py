"""`spot-fast train`: parse and validate the options, then call `spot_fast.train.train`.

    spot-fast train --stage 1 --cache CACHE --preset coco --out runs/teacher
    spot-fast train --stage 2 --cache CACHE --teacher runs/teacher --out runs/spot
    spot-fast train --cache CACHE --decoder mlp --set slot_attention.num_slots=6 --out runs/dinosaur
    torchrun --nproc-per-node 8 -m spot_fast.cli.app train --cache CACHE --out runs/teacher
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

# Short ablation flags -> the SPOTConfig fields they set.
SHORT_FLAGS = {"train_orders": "decoder.train_orders", "slots": "slot_attention.num_slots",
               "iterations": "slot_attention.num_iterations", "truncate": "slot_attention.truncate",
               "init": "slot_attention.init", "ce_weight": "optim.ce_weight"}


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


# Allowed values of the string-valued short flags.
CHOICES = {"decoder": ("mlp", "transformer"), "train_orders": ("random", "per_sample", "standard", "all"),
           "truncate": ("bi-level", "fixed-point", "none"), "init": ("shared_gaussian", "embedding")}


def ablation_overrides(decoder: str | None, short: dict[str, object]) -> dict[str, str]:
    """The short flags as --set overrides; `--decoder mlp` is the DINOSAUR baseline (raster order only)."""
    from spot_fast.train.config import TrainError
    for name, value in {"decoder": decoder, **short}.items():
        if name in CHOICES and value is not None and value not in CHOICES[name]:
            flag = "--" + name.replace("_", "-")
            raise TrainError(f"{flag} must be one of {', '.join(CHOICES[name])}, got {value!r}")
    out = {SHORT_FLAGS[k]: str(v) for k, v in short.items() if v is not None}
    if decoder is not None:
        out["decoder.kind"] = decoder
        if decoder == "mlp":
            out.setdefault("decoder.train_orders", "standard")
            out["decoder.eval_orders"] = "standard"
    return out


# The options `spot-fast sweep` shares with `spot-fast train`: one declaration each (flag, default, help).
STAGE = typer.Option(1, help="1: slot attention + decoder; 2: self-training from a stage-1 teacher.")
CACHE = typer.Option(None, help="Cache folder of a `--split both` build (train/ and val/).")
TRAIN_CACHE = typer.Option(None, help="Train cache (instead of --cache).")
VAL_CACHE = typer.Option(None, help="Val cache (default: CACHE/val when present).")
PRESET = typer.Option("coco", help="Model and optimiser defaults: coco, voc, movi-c, movi-e, tiny.")
EPOCHS = typer.Option(None, min=1, help="Epochs (default: the preset's).")
BATCH_SIZE = typer.Option(None, min=1, help="Batch per rank (default: the preset's).")
LR = typer.Option(None, min=0.0, help="Peak learning rate (default: the preset's).")
SEED = typer.Option(0, min=0, help="Seed of the data order, slot noise and patch orders.")
PRECISION = typer.Option("auto", help="auto (bf16 on CUDA) | bf16 | fp32 (also turns TF32 off).")
LOG_EVERY = typer.Option(50, min=1, help="Steps between log lines.")
CHECKPOINT_EVERY = typer.Option(0, min=0, help="Steps between checkpoints (0: every epoch).")
KEEP_LAST = typer.Option(3, min=1, help="Step checkpoints kept per run folder (plus best.pt).")
ALLOW_RANDOM_INIT = typer.Option(False, "--allow-random-init", metavar="", help="Accept a random-init cache or encoder "
                                 "(tests and the demo).")
DEVICE = typer.Option(None, help="cpu | cuda | cuda:N (default: cuda:LOCAL_RANK if present).")
DROP_LAST = typer.Option(True, metavar="", help="Drop the last short batch of every epoch.")
MAX_STEPS = typer.Option(0, min=0, help="Stop after this many steps (0: all epochs).")
EVAL_BATCH_SIZE = typer.Option(64, min=1, help="Batch of the validation passes.")


def train(
    stage: int = STAGE,
    cache: Optional[Path] = CACHE,
    train_cache: Optional[Path] = TRAIN_CACHE,
    val_cache: Optional[Path] = VAL_CACHE,
    stream: Optional[str] = typer.Option(None, help="Stream the train cache's WebDataset shards from these URLs "
                                         "(brace pattern, e.g. https://host/c/shard-{00000..00099}.tar)."),
    images: Optional[Path] = typer.Option(None, help="Dataset root: run the frozen encoder on the fly."),
    dataset: str = typer.Option("coco", help="Dataset of --images: coco, voc, movi, folder, synthetic."),
    weights: Optional[str] = typer.Option(None, help="--images: encoder weights file (default: the local "
                                          "HF / torch-hub cache; random-init with --allow-random-init)."),
    out: Path = typer.Option(Path("runs/spot"), help="Run folder."),
    preset: str = PRESET,
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
    epochs: Optional[int] = EPOCHS,
    batch_size: Optional[int] = BATCH_SIZE,
    lr: Optional[float] = LR,
    seed: int = SEED,
    precision: str = PRECISION,
    compile: bool = typer.Option(False, "--compile", metavar="", help="torch.compile the model."),
    log_every: int = LOG_EVERY,
    checkpoint_every: int = CHECKPOINT_EVERY,
    keep_last: int = KEEP_LAST,
    resume: bool = typer.Option(False, "--resume", metavar="", help="Continue the run in --out from its newest checkpoint."),
    allow_random_init: bool = ALLOW_RANDOM_INIT,
    device: Optional[str] = DEVICE,
    drop_last: bool = DROP_LAST,
    max_steps: int = MAX_STEPS,
    eval_batch_size: int = EVAL_BATCH_SIZE,
    progress: bool = typer.Option(True, metavar="", help="Show the progress bar."),
):
    """Train SPOT stage 1 or 2 from a feature cache (or from images), resumable, on one GPU or many."""
    from spot_fast.train import train as run_training
    short = dict(train_orders=train_orders, slots=slots, iterations=iterations, truncate=truncate, init=init,
                 ce_weight=ce_weight)
    overrides = {**ablation_overrides(decoder, short), **parse_sets(set_)}
    cfg = train_config(stage=stage, cache=cache, train_cache=train_cache, val_cache=val_cache, stream=stream,
                       images=images, dataset=dataset, weights=weights, out=out, preset=preset, overrides=overrides,
                       teacher=teacher, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, precision=precision,
                       compile=compile, log_every=log_every, checkpoint_every=checkpoint_every, keep_last=keep_last,
                       resume=resume, allow_random_init=allow_random_init, device=device, drop_last=drop_last,
                       max_steps=max_steps, eval_batch_size=eval_batch_size, progress=progress)
    cfg.validate()
    run = run_training(cfg)
    typer.echo(f"run finished: {run}")


def train_config(**options):
    """The TrainConfig of the given option values (paths as strings), for `train` and `sweep`."""
    from spot_fast.train import TrainConfig
    return TrainConfig(**{k: path_str(v) if isinstance(v, Path) else v for k, v in options.items()})


def path_str(path: Path | None) -> str | None:
    return None if path is None else str(path)
