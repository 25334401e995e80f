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

from spot_fast.cli import train as options     # the options shared with `spot-fast train`


def sweep(
    grid: list[str] = typer.Option([], "--grid", help="KEY=V1,V2,... (repeatable): the variants are the "
                                   "product, e.g. slot_attention.num_slots=5,6,7."),
    variants: Optional[Path] = typer.Option(None, help="TOML file of named variants ([variants.NAME] tables of "
                                            "overrides, optional [base]); multiplied by --grid."),
    stage: int = options.STAGE,
    cache: Optional[Path] = options.CACHE,
    train_cache: Optional[Path] = options.TRAIN_CACHE,
    val_cache: Optional[Path] = options.VAL_CACHE,
    out: Path = typer.Option(Path("runs/sweep"), help="Sweep folder: one run folder per variant, summary.md/csv, "
                             "masks.png."),
    preset: str = options.PRESET,
    set_: list[str] = typer.Option([], "--set", help="FIELD=VALUE for every variant (repeatable)."),
    teacher: Optional[str] = typer.Option(None, help="Stage 2: ONE stage-1 run / checkpoint shared by all "
                                          "variants (its forward runs once per step)."),
    teachers: Optional[Path] = typer.Option(None, help="Stage 2: a stage-1 sweep folder; each variant's teacher "
                                            "is the run of the same name in it."),
    stack: bool = typer.Option(False, "--stack", metavar="", help="Run variants of one architecture (differing only in "
                               "optimiser settings) as one vmapped model."),
    rank_by: str = typer.Option("decoder.mbo_i", help="Summary column that picks the best variant."),
    plan: bool = typer.Option(False, "--plan", metavar="", help="Print the variants, their memory and how many fit; "
                              "train nothing."),
    check_memory: bool = typer.Option(True, metavar="", help="Refuse a sweep whose memory estimate does not fit."),
    epochs: Optional[int] = options.EPOCHS,
    batch_size: Optional[int] = options.BATCH_SIZE,
    lr: Optional[float] = options.LR,
    seed: int = options.SEED,
    precision: str = options.PRECISION,
    log_every: int = options.LOG_EVERY,
    checkpoint_every: int = options.CHECKPOINT_EVERY,
    keep_last: int = options.KEEP_LAST,
    resume: bool = typer.Option(False, "--resume", metavar="", help="Continue the sweep in --out after a kill."),
    allow_random_init: bool = options.ALLOW_RANDOM_INIT,
    device: Optional[str] = options.DEVICE,
    drop_last: bool = options.DROP_LAST,
    max_steps: int = options.MAX_STEPS,
    eval_batch_size: int = options.EVAL_BATCH_SIZE,
):
    """Train a whole ablation grid in one pass over the cache: each batch is read once and trained
    into every variant; each variant gets its own `spot-fast train` run folder."""
    from spot_fast.sweep.run import SweepConfig, plan as plan_sweep, sweep as run_sweep
    cfg = options.train_config(stage=stage, cache=cache, train_cache=train_cache, val_cache=val_cache, out=out,
                               preset=preset, overrides=options.parse_sets(set_), teacher=teacher, epochs=epochs,
                               batch_size=batch_size, lr=lr, seed=seed, precision=precision, log_every=log_every,
                               checkpoint_every=checkpoint_every, keep_last=keep_last, resume=resume,
                               allow_random_init=allow_random_init, device=device, drop_last=drop_last,
                               max_steps=max_steps, eval_batch_size=eval_batch_size, progress=False)
    scfg = SweepConfig(train=cfg, grid=list(grid), variants_file=options.path_str(variants),
                       teachers=options.path_str(teachers), stack=stack, rank_by=rank_by, check_memory=check_memory)
    if plan:
        typer.echo(plan_sweep(scfg))
        return
    folder = run_sweep(scfg)
    typer.echo(f"sweep finished: {folder}")
