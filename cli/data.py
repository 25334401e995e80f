"""`spot-fast data ...` commands."""
from __future__ import annotations

from pathlib import Path

import typer

from spot_fast.cli.errors import at_least, on_interrupt
from spot_fast.cli.help import Command, Group

app = typer.Typer(no_args_is_help=True, cls=Group)


@app.callback()
def data():
    """Datasets: make the synthetic one."""


@app.command(cls=Command)
def synthetic(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="Folder to write (COCO layout: train2017/, val2017/, annotations/)."),
    num_train: int = typer.Option(64, callback=at_least(1), help="Training images, >= 1."),
    num_val: int = typer.Option(16, callback=at_least(1), help="Validation images, >= 1."),
    image_size: int = typer.Option(96, callback=at_least(16), help="Shorter image side in pixels, >= 16 (the "
                                   "longer side is 4/3 of it)."),
    seed: int = typer.Option(0, callback=at_least(0), help="Random seed; the dataset is a pure function of it."),
    overwrite: bool = typer.Option(False, "--overwrite", metavar="",
                                   help="Replace the synthetic dataset already in --out (only once the new "
                                   "one is complete)."),
):
    """Write a small procedural multi-object dataset in COCO format."""
    from rich.progress import Progress

    from spot_fast.data.synthetic import SyntheticConfig, write_synthetic

    config = SyntheticConfig(num_train=num_train, num_val=num_val, image_size=image_size, seed=seed)
    on_interrupt(ctx, f"{out} was left as it was")
    with Progress(transient=True) as progress:
        task = progress.add_task("rendering scenes", total=num_train + num_val)
        counts = write_synthetic(out, config, on_image=lambda: progress.advance(task), overwrite=overwrite)
    typer.echo(f"wrote {counts['train']} train + {counts['val']} val images, "
               f"{counts['annotations']} annotations to {out}")
