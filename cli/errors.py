"""How every `spot-fast` command reports the errors a user can cause.

Expected errors (a `UserError`, a `CacheError`, or an `OSError` such as a full disk or a
permission problem) print one red line, `error: <message>`, and exit with code 2; no traceback.
`--debug` (or SPOT_FAST_DEBUG=1) re-raises them to show the traceback. Ctrl-C prints what
happened to the work (commands say it with `on_interrupt`) and exits with code 130. Anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import typer

from spot_fast.cli.help import Group

USER_ERROR_EXIT = 2     # as click's own usage errors
INTERRUPTED_EXIT = 130  # 128 + SIGINT, the shell's convention
DEBUG_ENV = "SPOT_FAST_DEBUG"
_HINT_KEY = "spot_fast.on_interrupt"


def on_interrupt(ctx: typer.Context, message: str | Callable[[], str]) -> None:
    """What Ctrl-C during the command of `ctx` leaves behind (printed after "interrupted; "); a
    callable is asked at the moment of the interrupt (what is kept then)."""
    ctx.meta[_HINT_KEY] = message


def expected_errors() -> tuple[type[BaseException], ...]:
    from spot_fast.cache.manifest import CacheError
    from spot_fast.errors import UserError
    return UserError, CacheError, OSError


def _message(err: BaseException) -> str:
    from spot_fast.errors import UserError
    if isinstance(err, OSError) and not isinstance(err, UserError) and err.strerror:
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror} (check the path, its permissions and the free space)"
    return str(err)


class ErrorReportingGroup(Group):
    """The root command group: turns expected errors into one line and an exit code."""

    def invoke(self, ctx: typer.Context):
        from spot_fast.errors import speaking_cli
        try:
            with speaking_cli():        # messages name the command's options, not Python arguments
                return super().invoke(ctx)
        except KeyboardInterrupt as stop:
            from spot_fast.errors import Interrupted
            if isinstance(stop, Interrupted):       # the work said what it kept and how to continue
                message = str(stop)
            else:
                hint = ctx.meta.get(_HINT_KEY, "nothing was finished")
                message = f"interrupted; {hint() if callable(hint) else hint}"
            typer.secho(message, fg="yellow", err=True)
            raise typer.Exit(INTERRUPTED_EXIT) from None
        except expected_errors() as err:
            if ctx.params.get("debug") or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            typer.secho(f"error: {_message(err)}", fg="red", err=True)
            raise typer.Exit(USER_ERROR_EXIT) from None


def at_least(minimum: int):
    """An option callback refusing values below `minimum`: the message names the value and the range
    (typer's own `min=` names neither)."""
    def check(value):
        if value is not None and value < minimum:
            raise typer.BadParameter(f"{value} is out of range: it must be an integer >= {minimum}")
        return value
    return check
