"""`spot-fast train`: options generated from TrainConfig and SPOTConfig, validated, then
`spot_fast.train.train`.

    spot-fast train --stage 1 --cache CACHE --preset coco --out runs/teacher
    spot-fast train --stage 2 --cache CACHE --teacher runs/teacher --out runs/spot
    spot-fast train --cache CACHE --decoder mlp --slots 6 --out runs/dinosaur
    torchrun --nproc-per-node 8 -m spot_fast.cli.app train --cache CACHE --out runs/teacher
"""
from __future__ import annotations

import inspect
import os

import typer

from spot_fast.cli.errors import on_interrupt
from spot_fast.cli.options import command
from spot_fast.cli.train_options import SET, flag_errors, model_flags, run_flags, train_config


def first_rank() -> bool:
    """Rank 0 of a torchrun launch (or a lone process): the one that announces the result."""
    return int(os.environ.get("RANK", "0")) == 0


def train_command():
    """The `spot-fast train` command function, its options read from the dataclasses now."""
    flags = run_flags() + model_flags()

    def train(ctx: typer.Context, set_: list[str], **values):
        """Train SPOT stage 1 or 2 from a feature cache (or from images), resumable, on one GPU or many."""
        from spot_fast.threads import configure_threads
        from spot_fast.train import train as run_training
        cfg = train_config(flags, values, set_)
        with flag_errors(flags, values, set_):
            cfg.validate()
        on_interrupt(ctx, f"the run had not started: {cfg.out} holds what it held before")
        if cfg.threads is not None:     # the trainer applies the thread policy to None
            configure_threads(cfg.threads)
        run = run_training(cfg)
        if first_rank():
            typer.echo(f"run finished: {run}")
    return command(train, flags, head=[CTX, SET])


CTX = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
