"""`spot-fast eval RUN --cache CACHE`: metrics, label maps and pictures of a run's masks on a val cache."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from spot_fast.cli.errors import at_least

ORDERS = ("standard", "random", "all")


def evaluate(
    run: Path = typer.Argument(..., help="Run folder or checkpoint file."),
    cache: Path = typer.Option(..., help="Val cache, or a `--split both` folder (its val/ is used)."),
    orders: str = typer.Option("all", help="Patch orders decoded: standard | random | all."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: RUN/eval)."),
    batch_size: int = typer.Option(64, min=1, help="Images per forward."),
    num_pictures: int = typer.Option(8, min=0, help="Rows of the picture grid."),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | cuda:N (default: cuda if present)."),
    threads: Optional[int] = typer.Option(None, callback=at_least(1), help="Intra-op CPU threads (default: "
                                          "the thread policy: the cores this process may use)."),
    allow_random_init: bool = typer.Option(False, "--allow-random-init", metavar="",
                                           help="Accept a random-init cache."),
):
    """Evaluate a run: FG-ARI, mBO^i, mBO^c, mIoU of the decoder and slot-attention masks."""
    from spot_fast.evaluate import evaluate_run
    from spot_fast.threads import configure_threads
    from spot_fast.train_config import TrainError, check_device
    if orders not in ORDERS:
        raise TrainError(f"--orders must be one of {', '.join(ORDERS)}, got {orders!r}")
    check_device(device)
    configure_threads(threads)
    if out is None:
        out = (run if run.is_dir() else run.parent.parent) / "eval"
    result = evaluate_run(run, cache, orders=orders, batch_size=batch_size, out=out, num_pictures=num_pictures,
                          device=device, allow_random_init=allow_random_init)
    for kind in ("decoder", "slot_attention"):
        typer.echo(f"{kind:>15}: " + "  ".join(f"{k} {v:5.1f}" for k, v in result[kind].items()))
    typer.echo(f"{result['images']} images, orders {orders}; metrics, label maps and pictures in {out}")

