"""`spot-fast sweep`: parse and validate the options, then call `spot_fast.sweep.run.sweep`.

    spot-fast sweep --cache CACHE --preset coco --grid slot_attention.num_slots=5,6,7 \
        --grid slot_attention.truncate=none,bi-level --out runs/sweep
    spot-fast sweep --cache CACHE --variants ablations.toml --grid optim.lr=2e-4,4e-4 --stack --out runs/abl
    spot-fast sweep --stage 2 --cache CACHE --teachers runs/sweep --grid ... --out runs/sweep2
    spot-fast sweep ... --plan          # the variants, their memory, how many fit; trains nothing
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from spot_fast.cli.train import _str, parse_sets


def sweep(
    grid: list[str] = typer.Option([], "--grid", help="KEY=V1,V2,... (repeatable): the variants are the "
                                   "product, e.g. slot_attention.num_slots=5,6,7."),
    variants: Optional[Path] = typer.Option(None, help="TOML file of named variants ([variants.NAME] tables of "
                                            "overrides, optional [base]); multiplied by --grid."),
    stage: int = typer.Option(1, help="1: slot attention + decoder; 2: self-training from stage-1 teacher(s)."),
    cache: Optional[Path] = typer.Option(None, help="Cache folder of a `--split both` build (train/ and val/)."),
    train_cache: Optional[Path] = typer.Option(None, help="Train cache (instead of --cache)."),
    val_cache: Optional[Path] = typer.Option(None, help="Val cache (default: CACHE/val when present)."),
    out: Path = typer.Option(Path("runs/sweep"), help="Sweep folder: one run folder per variant, summary.md/csv, "
                             "masks.png."),
    preset: str = typer.Option("coco", help="Model and optimiser defaults: coco, voc, movi-c, movi-e, tiny."),
    set_: list[str] = typer.Option([], "--set", help="FIELD=VALUE for every variant (repeatable)."),
    teacher: Optional[str] = typer.Option(None, help="Stage 2: ONE stage-1 run / checkpoint shared by all "
                                          "variants (its forward runs once per step)."),
    teachers: Optional[Path] = typer.Option(None, help="Stage 2: a stage-1 sweep folder; each variant's teacher "
                                            "is the run of the same name in it."),
    stack: bool = typer.Option(False, "--stack", help="Run variants of one architecture (differing only in "
                               "optimiser settings) as one vmapped model."),
    rank_by: str = typer.Option("decoder.mbo_i", help="Summary column that picks the best variant."),
    plan: bool = typer.Option(False, "--plan", help="Print the variants, their memory and how many fit; "
                              "train nothing."),
    check_memory: bool = typer.Option(True, help="Refuse a sweep whose memory estimate does not fit."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Epochs (default: the preset's)."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Batch (default: the preset's)."),
    lr: Optional[float] = typer.Option(None, min=0.0, help="Peak learning rate of every variant."),
    seed: int = typer.Option(0, min=0, help="Seed of the data order, slot noise and patch orders."),
    precision: str = typer.Option("auto", help="auto (bf16 on CUDA) | bf16 | fp32."),
    log_every: int = typer.Option(50, min=1, help="Steps between log lines."),
    checkpoint_every: int = typer.Option(0, min=0, help="Steps between checkpoints (0: every epoch)."),
    keep_last: int = typer.Option(3, min=1, help="Step checkpoints kept per variant (plus best.pt)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the sweep in --out after a kill."),
    allow_random_init: bool = typer.Option(False, "--allow-random-init", help="Accept a random-init cache "
                                           "(tests and the demo)."),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | cuda:N."),
    drop_last: bool = typer.Option(True, help="Drop the last short batch of every epoch."),
    max_steps: int = typer.Option(0, min=0, help="Stop every variant after this many steps (0: all epochs)."),
    eval_batch_size: int = typer.Option(64, min=1, help="Batch of the validation passes."),
):
    """Train a whole ablation grid in one pass over the cache: each batch is read once and trained
    into every variant; each variant gets its own `spot-fast train` run folder."""
    from spot_fast.sweep.run import SweepConfig, plan as plan_sweep, sweep as run_sweep
    from spot_fast.train import TrainConfig
    cfg = TrainConfig(stage=stage, cache=_str(cache), train_cache=_str(train_cache), val_cache=_str(val_cache),
                      out=str(out), preset=preset, overrides=parse_sets(set_), teacher=teacher, epochs=epochs,
                      batch_size=batch_size, lr=lr, seed=seed, precision=precision, log_every=log_every,
                      checkpoint_every=checkpoint_every, keep_last=keep_last, resume=resume,
                      allow_random_init=allow_random_init, device=device, drop_last=drop_last,
                      max_steps=max_steps, eval_batch_size=eval_batch_size, progress=False)
    scfg = SweepConfig(train=cfg, grid=list(grid), variants_file=_str(variants), teachers=_str(teachers),
                       stack=stack, rank_by=rank_by, check_memory=check_memory)
    if plan:
        typer.echo(plan_sweep(scfg))
        return
    folder = run_sweep(scfg)
    typer.echo(f"sweep finished: {folder}")
