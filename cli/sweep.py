"""`spot-fast sweep`: the options of `spot-fast train` (cli/train_options.py: the same dataclasses) and
the sweep's own, validated, then `spot_fast.sweep.run.sweep`.

    spot-fast sweep --cache CACHE --preset coco --grid slot_attention.num_slots=5,6,7 \
        --grid slot_attention.truncate=none,bi-level --out runs/sweep
    spot-fast sweep --cache CACHE --variants ablations.toml --grid optim.lr=2e-4,4e-4 --stack --out runs/abl
    spot-fast sweep --stage 2 --cache CACHE --teachers runs/sweep --grid ... --out runs/sweep2
    spot-fast sweep ... --plan          # the variants, their memory, how many fit; trains nothing
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from spot_fast.cli.options import command
from spot_fast.cli.train_options import SET, flag_errors, model_flags, run_flags, train_config


def _option(name: str, annotation, default, *decls, **kw) -> inspect.Parameter:
    kw["help"] = escape(kw["help"])
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, *decls, rich_help_panel="Sweep", **kw))


SWEEP_OPTIONS = [
    _option("grid", list[str], [], "--grid", metavar="KEY=V1,V2", help="The variants are the product of the "
            "--grid axes (repeatable), e.g. slot_attention.num_slots=5,6,7."),
    _option("variants", Optional[Path], None, "--variants", help="TOML file of named variants: [variants.NAME] "
            "tables of overrides, an optional [base] table for all of them; multiplied by --grid."),
    _option("teachers", Optional[Path], None, "--teachers", help="Stage 2: a stage-1 sweep folder; each "
            "variant's teacher is the run of the same name in it (or --teacher: one for all)."),
    _option("stack", bool, False, "--stack", metavar="", help="Run variants of one architecture (differing "
            "only in optimiser settings) as one vmapped model."),
    _option("rank_by", str, "decoder.mbo_i", "--rank-by", help="Summary column that picks the best variant."),
    _option("plan", bool, False, "--plan", metavar="", help="Print the variants, their memory and how many fit; "
            "train nothing."),
    _option("check_memory", bool, True, "--check-memory/--no-check-memory", metavar="",
            help="Refuse a sweep whose memory estimate does not fit."),
]
# TrainConfig fields a sweep does not take: it reads one local cache, not images or a stream.
NOT_IN_SWEEP = ("images", "dataset", "weights", "stream")
RUN_DEFAULTS = {"out": "runs/sweep"}
RUN_HELP = {"progress": "a progress line per epoch (the variants' runs show no bars)",
            "out": "sweep folder: one run folder per variant, summary.md/csv, masks.png",
            "teacher": "stage 2: ONE stage-1 run / checkpoint shared by all variants (its forward runs once "
                       "per step)",
            "resume": "continue the sweep in --out after a kill"}


def sweep_command():
    """The `spot-fast sweep` command function, its options read from the dataclasses now."""
    flags = run_flags(skip=NOT_IN_SWEEP, defaults=RUN_DEFAULTS, helps=RUN_HELP) + model_flags()

    def sweep(set_: list[str], grid: list[str], variants: Optional[Path], teachers: Optional[Path], stack: bool,
              rank_by: str, plan: bool, check_memory: bool, **values):
        """Train a whole ablation grid in one pass over the cache: each batch is read once and trained
        into every variant; each variant gets its own `spot-fast train` run folder."""
        from spot_fast.sweep.run import SweepConfig, plan as plan_sweep, sweep as run_sweep
        cfg = train_config(flags, values, set_)
        scfg = SweepConfig(train=cfg, grid=list(grid), variants_file=None if variants is None else str(variants),
                           teachers=None if teachers is None else str(teachers), stack=stack, rank_by=rank_by,
                           check_memory=check_memory)
        with flag_errors(flags, values, set_):
            scfg.validate()
            check_variants(scfg)
        if cfg.threads is not None:     # the trainer applies the thread policy to None
            from spot_fast.threads import configure_threads
            configure_threads(cfg.threads)
        if plan:
            typer.echo(plan_sweep(scfg))
            return
        folder = run_sweep(scfg)
        typer.echo(f"sweep finished: {folder}")
    return command(sweep, flags, head=[SET, *SWEEP_OPTIONS])


def check_variants(scfg) -> None:
    """Refuse variants that resolve to the same model config (`num_slots=03,3`), before anything runs."""
    from spot_fast.sweep.grid import expand, resolve_variants
    from spot_fast.train_config import model_config
    resolve_variants(model_config(scfg.train), expand(scfg.grid, scfg.variants_file))
