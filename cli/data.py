"""`spot-fast data ...` commands."""
from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True)


@app.callback()
def data():
    """Datasets: make the synthetic one."""


@app.command()
def synthetic(
    out: Path = typer.Option(..., "--out", help="Folder to write (COCO layout: train2017/, val2017/, annotations/)."),
    num_train: int = typer.Option(64, help="Training images."),
    num_val: int = typer.Option(16, help="Validation images."),
    image_size: int = typer.Option(96, help="Shorter image side in pixels (the longer side is 4/3 of it)."),
    seed: int = typer.Option(0, help="Random seed; the dataset is a pure function of it."),
):
    """Write a small procedural multi-object dataset in COCO format."""
    from rich.progress import Progress

    from spot_fast.data.synthetic import SyntheticConfig, write_synthetic

    config = SyntheticConfig(num_train=num_train, num_val=num_val, image_size=image_size, seed=seed)
    with Progress(transient=True) as progress:
        task = progress.add_task("rendering scenes", total=num_train + num_val)
        counts = write_synthetic(out, config, on_image=lambda: progress.advance(task))
    typer.echo(f"wrote {counts['train']} train + {counts['val']} val images, "
               f"{counts['annotations']} annotations to {out}")
