"""`spot-fast bench`: spot-fast against the reference's way of training SPOT, one table of ratios."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def bench(
    preset: str = typer.Option("coco", help="Model shapes: coco (ViT-B/16, 196 tokens, 768 wide, 7 slots), voc, movi-c, movi-e, tiny."),
    batch: Optional[int] = typer.Option(None, help="Images per step (default: 64 on GPU, 8 on CPU)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    cache: Optional[Path] = typer.Option(None, help="A feature cache to read (default: synthetic features)."),
    sections: str = typer.Option("stage1,stage2,eval,data", help="Comma-separated subset of stage1,stage2,eval,data."),
    warmup: int = typer.Option(1, help="Untimed calls per path before timing."),
    repeats: Optional[int] = typer.Option(None, help="Timed calls per path (default: 10 on GPU, 3 on CPU)."),
    compile: str = typer.Option("auto", help="torch.compile the fast path: auto (GPU only) | on | off."),
    precision: str = typer.Option("auto", help="Fast path: auto | bf16 | fp32 | both (a row each). auto: bf16 on "
                                  "GPU; on a CPU fp32, and bf16 beside it if the CPU has native bf16 (AVX512-BF16, AMX)."),
    out: Optional[Path] = typer.Option(None, help="JSON folder (default: $OUT or benchmarks/results)."),
    save: bool = typer.Option(True, metavar="", help="Write the JSON result."),
    sweep: int = typer.Option(0, "--sweep", metavar="M", help="Instead: M variants trained in one sweep against "
                              "M separate runs (slot-count and lr grids; --preset, --cache, --batch, --device)."),
    steps: int = typer.Option(24, help="With --sweep: optimiser steps per variant."),
):
    """Time the reference path (JPEG + encoder + serial decoding) beside spot-fast (cache + fast model)."""
    from spot_fast.bench import BenchConfig, format_table, run_bench
    if sweep:
        return _sweep(sweep, preset, cache, batch, device, steps, out, save)
    cfg = BenchConfig(preset=preset, batch=batch, device=device, cache=None if cache is None else str(cache),
                      sections=tuple(s.strip() for s in sections.split(",") if s.strip()), warmup=warmup,
                      repeats=repeats, compile=compile, precision=precision,
                      out=None if out is None else str(out), save=save)
    cfg.validate()          # a BenchError is a UserError: the root command group reports it
    result = run_bench(cfg, log=lambda msg: typer.echo(msg, err=True))
    typer.echo(format_table(result))
    if "saved" in result:
        typer.echo(f"saved {result['saved']}")


def _sweep(variants: int, preset: str, cache: Optional[Path], batch: Optional[int], device: str, steps: int,
           out: Optional[Path], save: bool) -> None:
    from spot_fast.bench.sweep import SweepBenchConfig, format_sweep_table, run_sweep_bench
    from spot_fast.benchinfo import result_path, save_result
    cfg = SweepBenchConfig(variants=variants, preset=preset, cache=None if cache is None else str(cache),
                           batch_size=batch or 16, steps=steps, device=None if device == "auto" else device)
    result = run_sweep_bench(cfg)
    typer.echo(format_sweep_table(result))
    if save:
        path = save_result("bench_sweep", result, result_path("bench_sweep", out))
        typer.echo(f"saved {path}")
