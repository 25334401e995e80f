"""`spot-fast`: the command-line entry point. Each command group lives in its own module;
errors a user can cause are reported by `cli/errors.py` (one line, exit code 2)."""
from __future__ import annotations

from spot_fast.threads import passive_waits

passive_waits()     # before anything loads torch: OpenMP's idle threads sleep instead of spinning

import typer  # noqa: E402

from spot_fast.cli.errors import ErrorReportingGroup
from spot_fast.cli.help import Command


def _print_version(value: bool) -> None:
    if value:
        from spot_fast import __version__
        typer.echo(f"spot-fast {__version__}")
        raise typer.Exit()


def root(
    debug: bool = typer.Option(False, "--debug", metavar="",
                               help="Show the traceback of errors (also: SPOT_FAST_DEBUG=1)."),
    version: bool = typer.Option(False, "--version", metavar="", callback=_print_version, is_eager=True,
                                 help="Print the spot-fast version and exit."),
):
    """spot-fast: extract frozen features once, train SPOT from the cache."""


def version():
    """Print the spot-fast version."""
    _print_version(True)


def make_app() -> typer.Typer:
    """The `spot-fast` command, built now: `train` and `sweep` take their options from the config
    dataclasses as they are at this moment."""
    from spot_fast.cli.bench import bench_command
    from spot_fast.cli.cache import app as cache_app
    from spot_fast.cli.data import app as data_app
    from spot_fast.cli.demo import demo_command
    from spot_fast.cli.eval import evaluate
    from spot_fast.cli.sweep import sweep_command
    from spot_fast.cli.train import train_command
    app = typer.Typer(name="spot-fast", no_args_is_help=True, add_completion=False, cls=ErrorReportingGroup,
                      help="Train SPOT from cached frozen ViT features, fast and exact.")
    app.callback()(root)
    app.command(cls=Command)(version)
    app.add_typer(data_app, name="data", help="Datasets: make the synthetic one.")
    app.add_typer(cache_app, name="cache", help="Build, inspect and verify feature caches.")
    for name, command in (("train", train_command()), ("eval", evaluate), ("sweep", sweep_command()),
                          ("bench", bench_command()), ("demo", demo_command())):
        app.command(name, cls=Command)(command)
    return app



app = make_app()


def main():
    app()


if __name__ == "__main__":
    main()
