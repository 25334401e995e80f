"""The one base class of the errors a user can cause and fix.

A `UserError` (bad path, option value, weights file, dataset, cache) carries one short message
that names the input and the fix. The `spot-fast` command prints that message and exits with
code 2, without a traceback; Python callers catch it like any exception. Library code raises a
subclass where the error enters (`DatasetError`, `WeightsError`, `CheckpointMismatch`, ...).

Messages speak the caller's language: `arg("allow_random_init", True)` is `--allow-random-init`
while a `spot-fast` command runs (`speaking_cli()`), `allow_random_init=True` in Python.
"""
from __future__ import annotations

import contextlib
import contextvars


class UserError(Exception):
    """An error the user can fix; its message names the input and the fix."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying what the interrupted work kept and the command that continues it (the
    `spot-fast` command prints that one line; Python callers read it from the exception)."""


# ----------------------------------------------------------------------------- the caller's language

_ON_CLI = contextvars.ContextVar("spot_fast_on_cli", default=False)
_COMMAND = contextvars.ContextVar("spot_fast_command", default="")


@contextlib.contextmanager
def speaking_cli(command: str = ""):
    """Inside: messages name command-line options (`--allow-random-init`); outside, Python arguments.
    `command`: the running command's path ("spot-fast train"), for advice that differs by command."""
    tokens = _ON_CLI.set(True), _COMMAND.set(command or _COMMAND.get())
    try:
        yield
    finally:
        _ON_CLI.reset(tokens[0])
        _COMMAND.reset(tokens[1])


def on_cli() -> bool:
    return _ON_CLI.get()


def current_command() -> str:
    """The `spot-fast` command running ("spot-fast cache synthetic"), "" in Python."""
    return _COMMAND.get() if on_cli() else ""


def arg(name: str, value=...) -> str:
    """How the caller writes argument `name` (with `value`): `--lr 0.001`, `--allow-random-init`,
    `--no-drop-last`, `--set optim.clip=0.5` on the command line; `lr=0.001`,
    `allow_random_init=True`, `drop_last=False`, `overrides={'optim.clip': 0.5}` in Python."""
    if not on_cli():
        if "." in name:
            return f"overrides={{{name!r}: {value!r}}}" if value is not ... else f"overrides[{name!r}]"
        return name if value is ... else f"{name}={value!r}"
    if "." in name:
        return f"--set {name}" + ("" if value is ... else f"={value}")
    flag = "--" + name.replace("_", "-")
    if value is True:
        return flag
    if value is False:
        return "--no-" + name.replace("_", "-")
    return flag if value is ... else f"{flag} {value}"
