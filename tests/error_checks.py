"""What a user-facing error must look like; shared by the tests/test_errors_*.py modules.

A refusal exits with code 2 and prints ONE short `error:` line (or, for an option typer refuses,
its usage panel) that names the input and the fix; never a traceback.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from typer.testing import CliRunner

MAX_LINE = 400   # characters: "short"


def cli(*args, env: dict | None = None):
    from spot_fast.cli.app import app
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def flat(text: str) -> str:
    """Output with rich's box characters removed and whitespace collapsed (panels wrap lines)."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def assert_user_error(res, *names: str) -> str:
    """Exit code 2, no traceback, exactly one short `error:` line containing every one of `names`."""
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and len(lines[0]) < MAX_LINE, res.output
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def assert_option_refused(res, option: str, value: str, allowed: str) -> None:
    """typer's usage error for an option value: exit 2, the option, the value and the allowed range."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "rerun" not in res.output, res.output
    text = flat(res.output)
    assert f"'{option}'" in text and f"{value} is out of range" in text and allowed in text, text


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes: equal digests = nothing changed."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()
