"""The options `spot-fast train` and `spot-fast sweep` share, generated from TrainConfig and
SPOTConfig (cli/options.py), and the one way a command line becomes a validated TrainConfig:
flags and `--set` overrides, one precedence rule, errors that name the flag a value came from.

    flags = run_flags() + model_flags()
    cfg = train_config(flags, values, sets)          # values: the command's option values by name
    with flag_errors(flags, values, sets):
        cfg.validate()
"""
from __future__ import annotations

import contextlib
import inspect

import typer

from spot_fast.cli.options import Flag, config_flags, values_of
from spot_fast.config import SPOTConfig
from spot_fast.fields import type_hints
from spot_fast.train_config import SHADOWED, OverrideError, TrainConfig, TrainError

# What a flag implies when the same command line does not say otherwise: `--decoder mlp` is the
# DINOSAUR baseline, which only has the raster order.
IMPLIED = {("decoder.kind", "mlp"): {"decoder.train_orders": "standard", "decoder.eval_orders": "standard"}}
PRECEDENCE = "--set wins over a flag for the same field"
SECTION_PANELS = {"encoder": "Encoder (the cache's geometry; for --images runs)",
                  "optim": "Model: optimiser (default: the preset's)"}


def model_flags() -> list[Flag]:
    """A flag per SPOTConfig field, grouped by section; those a TrainConfig field sets are left out."""
    out = []
    for section, cls in type_hints(SPOTConfig).items():
        if not isinstance(cls, type):
            continue
        panel = SECTION_PANELS.get(section, f"Model: {section.replace('_', ' ')} (default: the preset's)")
        skip = {key.split(".")[1] for key in SHADOWED if key.startswith(section + ".")}
        out += config_flags(cls, section=section, panel=panel, skip=skip, keep_defaults=False)
    return out


def run_flags(skip=(), defaults=None, helps=None) -> list[Flag]:
    """The TrainConfig fields as flags (`overrides` is `--set`)."""
    return config_flags(TrainConfig, panel="Run", skip=("overrides", *skip), defaults=defaults, helps=helps)


def parse_sets(items: list[str]) -> dict[str, str]:
    """["a.b=v", ...] -> {"a.b": "v"} (the values are checked against the config later)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TrainError(f"--set {item!r}: write it as FIELD=VALUE, e.g. --set slot_attention.num_slots=6")
        out[key.strip()] = value.strip()
    return out


def train_config(flags: list[Flag], values: dict, sets: list[str], **fixed) -> TrainConfig:
    """The TrainConfig of a command line (not yet validated). One precedence rule between flags and
    --set, printed when both give a field."""
    by_key = {f.key: f for f in flags}
    given = model_values(flags, values)
    texts = parse_sets(sets)
    shadow = {key: values[name] for key, name in SHADOWED.items() if values.get(name) is not None}
    for key in sorted(set(texts) & (set(given) | set(shadow))):
        flag = by_key[key].option if key in by_key else "--" + SHADOWED[key].replace("_", "-")
        typer.secho(f"note: --set {key}={texts[key]} replaces {flag} {given.get(key, shadow.get(key))} "
                    f"({PRECEDENCE})", fg="yellow", err=True)
    return TrainConfig(**{**values_of(flags, values), **fixed, "overrides": {**given, **texts}})


def model_values(flags: list[Flag], values: dict) -> dict:
    """The model flags given on the command line by key, with what they imply."""
    given = values_of(flags, values, nested=True)
    for (key, value), implied in IMPLIED.items():
        if given.get(key) == value:
            given = {**implied, **given}
    return given


@contextlib.contextmanager
def flag_errors(flags: list[Flag], values: dict, sets: list[str]):
    """Inside: an OverrideError about a value that came from a model flag names that flag."""
    try:
        yield
    except OverrideError as e:
        flag = next((f for f in flags if f.key == e.key), None)
        if flag is None or e.key in parse_sets(sets) or e.key not in model_values(flags, values):
            raise
        raise TrainError(f"{flag.option} {e.value}: {e.problem}") from None


SET = inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, annotation=list[str], default=typer.Option(
    [], "--set", metavar="FIELD=VALUE", rich_help_panel="Run",
    help=f"Any config field, e.g. slot_attention.num_slots=6 (repeatable; {PRECEDENCE})."))
