"""Which variants a sweep trains: `--grid key=v1,v2` products and named variants from a TOML file.

A variant is a name and a set of config overrides (`"slot_attention.num_slots" -> "5"`), the same
strings `spot-fast train --set key=value` takes, so a variant's run folder records exactly what a
single run of it would. Keys are dotted paths into `SPOTConfig`; keys that would change the data
stream every variant shares (encoder, batch size, epochs, stage) cannot vary inside one sweep.

    variants = expand(grid=["slot_attention.num_slots=5,6,7", "slot_attention.truncate=none,bi-level"])
    cfg = resolve(preset("coco"), variants[0].overrides)
"""
from __future__ import annotations

import dataclasses
import itertools
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from spot_fast.config import SPOTConfig

# Keys a sweep cannot vary: every variant reads the same batches from the same cache.
FIXED_KEYS = {
    "stage": "the stage is the whole sweep's (--stage)",
    "optim.batch_size": "every variant trains on the same batches (--batch-size)",
    "optim.epochs": "every variant makes the same passes over the cache (--epochs)",
}
FIXED_SECTIONS = {"encoder": "the cache fixes the encoder"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


class GridError(ValueError):
    """A grid or variants file the sweep cannot run; the message names the input and the fix."""


@dataclass(frozen=True)
class Variant:
    name: str                                            # run-folder name inside the sweep's --out
    overrides: dict[str, str] = field(default_factory=dict)   # dotted SPOTConfig key -> value text


def _field_types(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _parse_value(key: str, text: str, kind) -> object:
    """`text` as the field's type: int, float, bool, str, or one of those or None ("none")."""
    args = typing.get_args(kind)
    if type(None) in args:
        if text.lower() in ("none", "null"):
            return None
        kind = next(a for a in args if a is not type(None))
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        return kind(text)
    except ValueError:
        raise GridError(f"{key}={text!r}: not a valid {getattr(kind, '__name__', kind)}") from None


def _check_key(key: str) -> tuple[type, str]:
    """The dataclass holding `key` and the field name; GridError for unknown or fixed keys."""
    if key in FIXED_KEYS:
        raise GridError(f"{key} cannot vary inside a sweep: {FIXED_KEYS[key]}")
    section, _, name = key.partition(".")
    if section in FIXED_SECTIONS:
        raise GridError(f"{key} cannot vary inside a sweep: {FIXED_SECTIONS[section]}")
    sections = _sections()
    if section not in sections or not name:
        raise GridError(f"unknown key {key!r}: use section.field with section one of {sorted(sections)}")
    cls = sections[section]
    known = [f.name for f in dataclasses.fields(cls)]
    if name not in known:
        raise GridError(f"unknown key {key!r}: {section} has {', '.join(known)}")
    return cls, name


def _sections() -> dict[str, type]:
    hints = _field_types(SPOTConfig)
    return {name: kind for name, kind in hints.items() if dataclasses.is_dataclass(kind)}


def resolve(base: SPOTConfig, overrides: dict[str, str]) -> SPOTConfig:
    """`base` with the overrides applied and every section re-validated; GridError on bad input."""
    changes: dict[str, dict[str, object]] = {}
    for key, text in overrides.items():
        cls, name = _check_key(key)
        changes.setdefault(key.split(".")[0], {})[name] = _parse_value(key, text, _field_types(cls)[name])
    parts = {}
    for section, values in changes.items():
        try:
            parts[section] = dataclasses.replace(getattr(base, section), **values)
        except ValueError as e:          # the section's own __post_init__ checks
            shown = ", ".join(f"{section}.{k}={v}" for k, v in values.items())
            raise GridError(f"{shown}: {e}") from None
    return dataclasses.replace(base, **parts)


def parse_grid(spec: str) -> tuple[str, list[str]]:
    """`key=v1,v2,...` -> (key, values); GridError naming the spec when it is malformed."""
    key, sep, values = spec.partition("=")
    key = key.strip()
    items = [v.strip() for v in values.split(",")]
    if not sep or not key or not all(items):
        raise GridError(f"--grid {spec!r}: write key=value1,value2 (e.g. slot_attention.num_slots=5,6,7)")
    if len(set(items)) != len(items):
        raise GridError(f"--grid {spec!r}: a value is listed twice")
    _check_key(key)
    return key, items


def _flatten(table: dict, prefix: str = "") -> dict[str, str]:
    """A TOML table (nested or with dotted keys) -> {"a.b": "value text"}."""
    out = {}
    for k, v in table.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, bool):
            out[prefix + k] = str(v).lower()
        elif isinstance(v, (int, float, str)):
            out[prefix + k] = str(v)
        else:
            raise GridError(f"{prefix + k}: a variant value must be a number, a string or a boolean")
    return out


def load_variants(path: str | Path) -> list[Variant]:
    """Named variants from a TOML file: one table per variant under `[variants.NAME]`, each
    holding config overrides; an optional `[base]` table applies to every variant."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise GridError(f"cannot read the variants file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise GridError(f"variants file {path} is not valid TOML: {e}") from None
    unknown = set(data) - {"base", "variants"}
    if unknown or not isinstance(data.get("variants"), dict) or not data["variants"]:
        raise GridError(f"variants file {path}: write [variants.NAME] tables (and optionally [base]); "
                        f"found {sorted(data)}")
    base = _flatten(data.get("base", {}))
    return [Variant(name, {**base, **_flatten(table)}) for name, table in data["variants"].items()]


def _short_keys(keys: list[str]) -> dict[str, str]:
    """The field name alone where it is unambiguous among `keys`, else the full dotted key."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def expand(grid: list[str] = (), variants_file: str | Path | None = None) -> list[Variant]:
    """Every variant of the sweep: the named variants (or one unnamed) times the grid product.
    Names: `name_key=value_key=value` with short keys; GridError on duplicates or bad names."""
    axes = [parse_grid(s) for s in grid]
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise GridError(f"--grid lists a key twice: {sorted(k for k in keys if keys.count(k) > 1)[0]}")
    named = load_variants(variants_file) if variants_file else [Variant("")]
    short = _short_keys(keys)
    out = []
    for v in named:
        for values in itertools.product(*(vals for _, vals in axes)):
            point = dict(zip(keys, values))
            clash = set(point) & set(v.overrides)
            if clash:
                raise GridError(f"variant {v.name!r} sets {sorted(clash)[0]}, which --grid also varies")
            label = "_".join([v.name] * bool(v.name) + [f"{short[k]}={x}" for k, x in point.items()])
            out.append(Variant(label or "base", {**v.overrides, **point}))
    for v in out:
        if not _NAME.match(v.name):
            raise GridError(f"variant name {v.name!r}: use letters, digits and . _ = + - only")
        for key in v.overrides:
            _check_key(key)
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise GridError(f"two variants are named {next(n for n in names if names.count(n) > 1)!r}")
    return out
