"""`spot-fast bench`: spot-fast against the reference's way of training SPOT, one table of ratios."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def bench(
    preset: str = typer.Option("coco", help="Model shapes: coco (ViT-B/16, 196 tokens, 768 wide, 7 slots), voc, movi-c, movi-e, demo, tiny."),
    batch: Optional[int] = typer.Option(None, help="Images per step (default: 64 on GPU, 8 on CPU)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    cache: Optional[Path] = typer.Option(None, help="A feature cache, or a --split both folder, to read (default: "
                                         "one of the preset's shape is built in a temporary folder)."),
    sections: str = typer.Option("stage1,stage2,eval,data", help="Comma-separated subset of "
                                 "stage1,stage2,eval,data,contended,sweep."),
    warmup: int = typer.Option(1, help="Untimed calls per row before timing."),
    repeats: Optional[int] = typer.Option(None, help="Timed calls per row (default: 10 on GPU, 3 on CPU)."),
    compile: str = typer.Option("auto", help="torch.compile the fast rows: auto (GPU only) | on | off."),
    precision: str = typer.Option("auto", help="Fast rows: auto | bf16 | fp32 | both (a row each). auto: bf16 on "
                                  "GPU; on a CPU fp32, and bf16 beside it if the CPU has native bf16 (AVX512-BF16, AMX)."),
    threads: Optional[int] = typer.Option(None, help="Torch CPU threads (default: the thread policy: the usable "
                                          "cores, one for small work)."),
    reference_repo: Optional[Path] = typer.Option(None, help="A checkout of the SPOT reference repository: the "
                                                  "reference rows run its own code (default: spot-fast's transcription)."),
    loader_workers: int = typer.Option(4, help="The reference loader's workers (the reference's 4)."),
    sweep_variants: int = typer.Option(4, help="Section sweep: variants per grid (slot-count and lr grids)."),
    sweep_steps: int = typer.Option(24, help="Section sweep: optimiser steps per variant."),
    out: Optional[Path] = typer.Option(None, help="JSON folder (default: ./bench-results)."),
    save: bool = typer.Option(True, metavar="", help="Write the JSON result."),
):
    """Time the reference's step (its loader, ViT, serial decoding) beside spot-fast's (cache reader + fast model)."""
    from spot_fast.bench import BenchConfig, format_table, run_bench
    cfg = BenchConfig(preset=preset, batch=batch, device=device, cache=None if cache is None else str(cache),
                      sections=tuple(s.strip() for s in sections.split(",") if s.strip()), warmup=warmup,
                      repeats=repeats, compile=compile, precision=precision, threads=threads,
                      reference_repo=None if reference_repo is None else str(reference_repo),
                      loader_workers=loader_workers, sweep_variants=sweep_variants, sweep_steps=sweep_steps,
                      out=None if out is None else str(out), save=save)
    cfg.validate()          # a BenchError is a UserError: the root command group reports it
    result = run_bench(cfg, log=lambda msg: typer.echo(msg, err=True))
    typer.echo(format_table(result))
    if "saved" in result:
        typer.echo(f"saved {result['saved']}")
