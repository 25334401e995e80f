"""`spot-fast`: the command-line entry point. Each command group lives in its own module."""
from __future__ import annotations

import typer

app = typer.Typer(name="spot-fast", no_args_is_help=True, add_completion=False,
                  help="Train SPOT from cached frozen ViT features, fast and exact.")


@app.callback()
def root():
    """spot-fast: extract frozen features once, train SPOT from the cache."""


@app.command()
def version():
    """Print the spot-fast version."""
    from spot_fast import __version__
    typer.echo(__version__)


def _register():
    from spot_fast.cli.cache import app as cache_app
    from spot_fast.cli.data import app as data_app
    app.add_typer(data_app, name="data", help="Datasets: make the synthetic one.")
    app.add_typer(cache_app, name="cache", help="Build, inspect and verify feature caches.")
    from spot_fast.cli.eval import evaluate as eval_command
    from spot_fast.cli.train import train as train_command
    app.command("train")(train_command)
    app.command("eval")(eval_command)
    from spot_fast.cli.bench import bench as bench_command
    app.command("bench")(bench_command)


_register()


def main():
    app()


if __name__ == "__main__":
    main()
