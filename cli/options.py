"""Command-line options generated from config dataclasses: one declaration per setting.

Each field of a dataclass becomes an option: its type hint gives the value type, its `setting(...)`
bounds and choices (spot_fast/fields.py) are checked where the value enters, the comment after the
field is the help. `spot-fast train` and `sweep` take every TrainConfig field (`--lr`, `--threads`)
and every SPOTConfig field: `--SECTION-FIELD` (`--optim-clip`, `--decoder-num-blocks`) or the short
name the field declares (`--slots`, `--truncate`); `--set a.b=v` stays for scripts.

    flags = config_flags(BenchConfig, panel="Benchmark")        # any dataclass, e.g. for `bench`
    bench = command(run_bench_cli, flags)                        # run_bench_cli(**values)
    cfg = BenchConfig(**values_of(flags, values))

A model flag left out keeps the preset's value (its default is None).
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass
from typing import Optional

import typer
from rich.markup import escape

from spot_fast.errors import UserError
from spot_fast.fields import base_type, bounds_text, choices_of, field_help, problem_with, type_hints


@dataclass(frozen=True)
class Flag:
    key: str                    # what it sets: a field name ("lr") or a dotted SPOTConfig key ("slot_attention.init")
    param: str                  # the command function's parameter name
    option: str                 # "--slots"
    field: dataclasses.Field    # the dataclass field (bounds, choices)
    hint: object                # its type hint
    default: object             # the command line's default (None: the config's own value)
    help: str
    panel: str                  # the --help section it is listed under


# The word a section's options start with (`--slot-num-heads`); a field already starting with it
# is not prefixed twice (`--slot-size`).
PREFIXES = {"slot_attention": "slot"}


def option_name(section: str, f: dataclasses.Field) -> str:
    """`--` + the field's declared flag, else `SECTION-FIELD` (a plain field name outside sections)."""
    prefix = PREFIXES.get(section, section)
    name = f.metadata.get("flag") or (f.name if not prefix or f.name.startswith(prefix + "_")
                                      else f"{prefix}-{f.name}")
    return "--" + name.replace("_", "-")


def config_flags(cls, *, section: str = "", panel: str = "Options", skip=(), defaults=None, helps=None,
                 keep_defaults: bool = True) -> list[Flag]:
    """One Flag per field of dataclass `cls` (nested dataclass fields and `skip` left out).
    `section`: the dotted prefix of the keys; `defaults` / `helps`: per-field replacements;
    `keep_defaults=False`: every default is None (the field keeps the config's value)."""
    hints, out = type_hints(cls), []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if f.name in skip or dataclasses.is_dataclass(hint) or typing.get_origin(hint) is dict:
            continue
        default = (defaults or {}).get(f.name, f.default if keep_defaults else None)
        if default is dataclasses.MISSING:
            default = None
        key = f"{section}.{f.name}" if section else f.name
        out.append(Flag(key, key.replace(".", "__"), option_name(section, f), f, hint, default,
                        (helps or {}).get(f.name) or field_help(cls, f), panel))
    return out


def _check(flag: Flag):
    """The option callback: the field's own check, where the value enters."""
    def check(value):
        problem = None if value is None else problem_with(flag.field, flag.hint, value)
        if problem and problem.startswith(("must be >", "must be <")):
            raise typer.BadParameter(f"{value} is out of range: it {problem.rsplit(', got', 1)[0]}")
        if problem:
            raise UserError(f"{flag.option} {problem}")
        return value
    return check


def _annotation(flag: Flag):
    t, _ = base_type(flag.hint)
    choices = choices_of(flag.field, flag.hint)
    if choices is not None:
        t = type(choices[0])
    return t if flag.default is not None else Optional[t]


def typer_parameter(flag: Flag) -> inspect.Parameter:
    t, _ = base_type(flag.hint)
    choices = choices_of(flag.field, flag.hint)
    decls = [flag.option]
    if t is bool and flag.default is not False:         # on by default, or the config's: both spellings
        decls = [f"{flag.option}/--no-{flag.option[2:]}"]
    text = flag.help
    if choices is not None and not all(str(c) in text for c in choices):
        text += f" (one of: {', '.join(str(c) for c in choices)})"
    elif bounds_text(flag.field):
        text += f" ({bounds_text(flag.field)})"
    option = typer.Option(flag.default, *decls, help=escape(text), callback=_check(flag), rich_help_panel=flag.panel,
                          metavar="" if t is bool else None, show_default=flag.default is not None)
    return inspect.Parameter(flag.param, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=_annotation(flag))


def command(run, flags: list[Flag], head: list[inspect.Parameter] = ()):
    """A typer command function: `head` (hand-written parameters) then one option per flag; calls
    `run(**values)` with every parameter by name. Its docstring is `run`'s."""
    def cmd(**values):
        return run(**values)
    params = [*head, *(typer_parameter(f) for f in flags)]
    cmd.__signature__ = inspect.Signature(params)
    cmd.__annotations__ = {p.name: p.annotation for p in params}
    cmd.__name__, cmd.__doc__ = run.__name__, run.__doc__
    return cmd


def values_of(flags: list[Flag], values: dict, nested: bool = False) -> dict:
    """The option values of `flags` by key: the plain fields (`nested=False`) or the dotted keys
    given on the command line (`nested=True`, None left out)."""
    if nested:
        return {f.key: values[f.param] for f in flags if "." in f.key and values[f.param] is not None}
    return {f.key: values[f.param] for f in flags if "." not in f.key}
