"""`spot-fast bench`: spot-fast against the reference's way of training SPOT, one table of ratios.
Its options are BenchConfig's fields (spot_fast/bench/config.py), generated as `train`'s are from
TrainConfig; `--sections` takes the tuple field as one comma-separated word."""
from __future__ import annotations

import dataclasses
import inspect

import typer

from spot_fast.cli.options import command, config_flags, values_of


def bench_command():
    """The `spot-fast bench` command function, its options read from BenchConfig as it is now."""
    from spot_fast.bench.config import DEFAULT_SECTIONS, BenchConfig
    from spot_fast.fields import field_help
    flags = config_flags(BenchConfig, skip=("sections",))
    field = next(f for f in dataclasses.fields(BenchConfig) if f.name == "sections")
    sections = inspect.Parameter("sections", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=typer.Option(
        ",".join(DEFAULT_SECTIONS), "--sections", help=field_help(BenchConfig, field)))

    def bench(sections: str, **values):
        """Time the reference's step (its loader, ViT, serial decoding) beside spot-fast's (cache reader +
        fast model)."""
        from spot_fast.bench import format_table, run_bench
        cfg = BenchConfig(**values_of(flags, values),
                          sections=tuple(s.strip() for s in sections.split(",") if s.strip()))
        cfg.validate(cli=True)  # a BenchError is a UserError: the root command group reports it
        result = run_bench(cfg, log=lambda msg: typer.echo(msg, err=True))
        typer.echo(format_table(result))
        if "saved" in result:
            typer.echo(f"saved {result['saved']}")
    return command(bench, flags, head=[sections])
