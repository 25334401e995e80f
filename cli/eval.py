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
    if (cache / "val" / "manifest.json").is_file():
        cache = cache / "val"
    check_val_cache(cache)
    if out is None:
        out = (run if run.is_dir() else run.parent.parent) / "eval"
    result = evaluate_run(run, cache, orders=orders, batch_size=batch_size, out=out, num_pictures=num_pictures,
                          device=device, allow_random_init=allow_random_init)
    for kind in ("decoder", "slot_attention"):
        typer.echo(f"{kind:>15}: " + "  ".join(f"{k} {v:5.1f}" for k, v in result[kind].items()))
    typer.echo(f"{result['images']} images, orders {orders}; metrics, label maps and pictures in {out}")


def check_val_cache(cache: Path) -> None:
    """A TrainError unless `cache` is a val cache (the only kind with ground-truth masks)."""
    from spot_fast.cache import read_manifest
    from spot_fast.train_config import TrainError
    if not (cache / "manifest.json").is_file():
        return                      # the cache reader says what is there instead
    from spot_fast.commands import cache_command
    manifest = read_manifest(cache)
    if manifest.get("split") != "val":
        out = cache.parent / "val" if cache.name == "train" else cache.with_name(cache.name + "-val")
        command = cache_command(manifest, out, split="val")
        how = f"`{command}`" if command else "this cache's options and --split val"
        raise TrainError(f"--cache {cache} is a {manifest.get('split')} cache (no ground-truth masks): evaluate on "
                         f"a val cache; build one with {how}")
