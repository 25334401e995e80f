"""Config fields that say which values they take: the one validation layer of every config.

    num_slots: int = setting(7, min=1)             # K
    init: Literal["shared_gaussian", "embedding"] = "shared_gaussian"
    lr: float = setting(4e-4, above=0)             # finite, > 0

A config's `__post_init__` calls `check_fields(self)`, which refuses a value of the wrong type,
outside its bounds or not among its choices (a `typing.Literal` type or `setting(choices=...)`),
naming the field: `ConfigError("num_slots", "must be >= 1, got 0")`. Rules across fields stay in
the `__post_init__` beside it. The CLI builds its options from the same fields
(`spot_fast/cli/options.py`): type, bounds, choices, and the comment after the field as help.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import math
import numbers
import tokenize
import typing
from functools import cache

from spot_fast.errors import UserError

_BOUNDS = ("min", "above", "max")


class ConfigError(UserError, ValueError):
    """A config value its field does not take. `key` names the field (dotted inside SPOTConfig:
    "slot_attention.num_slots"); the message reads "slot_attention num_slots must be >= 1, got 0"."""

    def __init__(self, key: str, problem: str, message: str | None = None):
        self.key, self.problem, self.message = key, problem, message
        super().__init__(message or f"{key.replace('.', ' ')} {problem}")

    def within(self, section: str) -> "ConfigError":
        """The same error named from the enclosing config (`section.key`)."""
        return ConfigError(f"{section}.{self.key}", self.problem, self.message)


def setting(default=dataclasses.MISSING, *, min=None, above=None, max=None, choices=None, factory=None,
            flag: str | None = None, help: str | None = None):
    """A dataclass field with its accepted values: `min <= v <= max`, `v > above` (numbers are also
    finite), one of `choices`; `flag`: a short CLI option name instead of the generated one; `help`:
    for a field without a comment (a class made by `dataclasses.make_dataclass`)."""
    meta = {k: v for k, v in dict(min=min, above=above, max=max, choices=choices, flag=flag, help=help).items()
            if v is not None}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def base_type(hint) -> tuple[object, bool]:
    """(the type without `| None`, whether None is allowed)."""
    args = typing.get_args(hint)
    if type(None) in args and typing.get_origin(hint) is not typing.Literal:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return hint, False


def choices_of(f: dataclasses.Field, hint) -> tuple | None:
    """The values field `f` takes, from a Literal type or `setting(choices=...)`; None: any."""
    t, _ = base_type(hint)
    if typing.get_origin(t) is typing.Literal:
        return typing.get_args(t)
    choices = f.metadata.get("choices")
    return tuple(choices) if choices is not None else None


def say_choices(choices: tuple) -> str:
    if len(choices) == 2:
        return " or ".join(repr(c) for c in choices)
    return "one of " + ", ".join(str(c) for c in choices)


def problem_with(f: dataclasses.Field, hint, value) -> str | None:
    """What is wrong with `value` for field `f` ("must be >= 1, got 0"), or None."""
    t, optional = base_type(hint)
    if value is None:
        return None if optional else "must be given, got None"
    choices = choices_of(f, hint)
    if choices is not None:
        ok = value in choices and type(value) in {type(c) for c in choices}
        return None if ok else f"must be {say_choices(choices)}, got {value!r}"
    if t is bool and not isinstance(value, bool):
        return f"must be true or false, got {value!r}"
    if t is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        return f"must be an integer, got {value!r}"
    if t is float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        return f"must be a number, got {value!r}"
    if t is str and not isinstance(value, str):
        return f"must be a string, got {value!r}"
    if t in (int, float):
        meta = f.metadata
        if t is float and not math.isfinite(value):
            return f"must be finite, got {value}"
        if "min" in meta and value < meta["min"]:
            return f"must be >= {meta['min']}, got {value}"
        if "above" in meta and not value > meta["above"]:
            return f"must be > {meta['above']}, got {value}"
        if "max" in meta and value > meta["max"]:
            return f"must be <= {meta['max']}, got {value}"
    return None


def bounds_text(f: dataclasses.Field) -> str:
    """The field's numeric range in words (">= 1", "> 0"), "" when unbounded."""
    m = f.metadata
    words = {"min": ">=", "above": ">", "max": "<="}
    return " and ".join(f"{words[k]} {m[k]}" for k in _BOUNDS if k in m)


def check_fields(cfg) -> None:
    """ConfigError naming the first field of dataclass instance `cfg` that holds a value it does not take."""
    hints = type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        problem = problem_with(f, hints[f.name], getattr(cfg, f.name))
        if problem:
            raise ConfigError(f.name, problem)


def parse_text(text: str, hint):
    """`text` (a `--set` / `--grid` value) as a value of type `hint`; ValueError naming the type."""
    t, optional = base_type(hint)
    if optional and text.strip().lower() in ("none", "null"):
        return None
    if typing.get_origin(t) is typing.Literal:
        kinds = {type(c) for c in typing.get_args(t)}
        t = int if kinds == {int} else str
    if t is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError("expected a value of type bool (true or false)")
        return text.lower() in ("true", "1", "yes")
    try:
        return t(text) if t in (int, float) else str(text)
    except ValueError:
        raise ValueError(f"expected a value of type {getattr(t, '__name__', t)}") from None


def type_hints(cls) -> dict:
    """The resolved type hints of dataclass `cls` (read afresh: a config class may be replaced)."""
    return typing.get_type_hints(cls)


@cache
def field_comments(cls) -> dict[str, str]:
    """Field name -> the comment after it in the source of `cls` or a base class (or the comment
    lines just above it); nothing for a class without source (`dataclasses.make_dataclass`)."""
    out = {}
    for c in reversed(cls.__mro__[:-1]):
        out.update(_own_comments(c))
    return out


def _own_comments(cls) -> dict[str, str]:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    names = set(getattr(cls, "__annotations__", {}))
    comments, above, out = {}, [], {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    for i, line in enumerate(source.splitlines(), start=1):
        stripped = line.strip()
        name = stripped.split(":", 1)[0].strip()
        if stripped.startswith("#"):
            above.append(comments.get(i, ""))
            continue
        if name in names and ":" in stripped and name not in out:
            out[name] = comments.get(i) or " ".join(above)
        above = []
    return out


def field_help(cls, f: dataclasses.Field) -> str:
    """The help of field `f`: `metadata["help"]`, else its comment, else its name."""
    return f.metadata.get("help") or field_comments(cls).get(f.name) or f.name.replace("_", " ")
