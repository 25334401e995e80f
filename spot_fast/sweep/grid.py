"""Which variants a sweep trains: `--grid key=v1,v2` products and named variants from a TOML file.

A variant is a name and a set of config overrides (`"slot_attention.num_slots" -> "5"`), the same
strings `spot-fast train --set key=value` takes, so a variant's run folder records exactly what a
single run of it would. Keys are dotted paths into `SPOTConfig`; keys that would change the data
stream every variant shares (encoder, batch size, epochs, stage) cannot vary inside one sweep.

    variants = expand(grid=["slot_attention.num_slots=5,6,7", "slot_attention.truncate=none,bi-level"])
    cfg = resolve(preset("coco"), variants[0])
    resolved = resolve_variants(preset("coco"), variants)      # [(variant, config)]; refuses duplicates
"""
from __future__ import annotations

import difflib
import itertools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from spot_fast.config import SPOTConfig
from spot_fast.train.config import TrainError, apply_overrides, check_distinct_variants, config_keys, parse_value

# Keys a sweep cannot vary: every variant reads the same batches from the same cache.
FIXED_KEYS = {
    "stage": "the stage is the whole sweep's (--stage)",
    "optim.batch_size": "every variant trains on the same batches (--batch-size)",
    "optim.epochs": "every variant makes the same passes over the cache (--epochs)",
}
FIXED_SECTIONS = {"encoder": "the cache fixes the encoder"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


class GridError(TrainError):
    """A grid or variants file the sweep cannot run; the message names the input and the fix."""


@dataclass(frozen=True)
class Variant:
    name: str                                            # run-folder name inside the sweep's --out
    overrides: dict[str, str] = field(default_factory=dict)   # dotted SPOTConfig key -> value text


def _check_key(key: str) -> None:
    """GridError for a key that is not a SPOTConfig field or that cannot vary inside a sweep."""
    if key in FIXED_KEYS:
        raise GridError(f"{key} cannot vary inside a sweep: {FIXED_KEYS[key]}")
    section = key.split(".")[0]
    if section in FIXED_SECTIONS:
        raise GridError(f"{key} cannot vary inside a sweep: {FIXED_SECTIONS[section]}")
    keys = config_keys()
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"keys: {', '.join(sorted(keys))}"
        raise GridError(f"unknown key {key!r}: {hint}")


def resolve(base: SPOTConfig, variant: Variant) -> SPOTConfig:
    """`base` with the variant's overrides (the trainer's --set rules); GridError naming the variant."""
    try:
        return apply_overrides(base, variant.overrides)
    except TrainError as e:
        raise GridError(f"variant {variant.name}: {e}") from None


def resolve_variants(base: SPOTConfig, variants: list[Variant]) -> list[tuple[Variant, SPOTConfig]]:
    """Every variant with its resolved config: the one place a sweep's variants get their configs,
    so every duplicate (a value listed twice, `03` and `3`, `1e-3` and `0.001`, a variant that repeats
    another or the base) is refused the same way, by comparing the configs the variants train."""
    resolved = [(v, resolve(base, v)) for v in variants]
    check_distinct_variants([(v.name, cfg) for v, cfg in resolved])
    names = [v.name for v in variants]      # distinct configs, one name (a name that holds a '_'): one folder
    if len(set(names)) != len(names):
        raise GridError(f"two variants are named {next(n for n in names if names.count(n) > 1)!r}: rename one")
    return resolved


def parse_grid(spec: str) -> tuple[str, list[str]]:
    """`key=v1,v2,...` -> (key, values); GridError naming the spec when it is malformed."""
    key, sep, values = spec.partition("=")
    key = key.strip()
    items = [v.strip() for v in values.split(",")]
    if not sep or not key or not all(items):
        raise GridError(f"--grid {spec!r}: write key=value1,value2 (e.g. slot_attention.num_slots=5,6,7)")
    _check_key(key)
    try:
        for v in items:
            parse_value(key, v, config_keys()[key])
    except TrainError as e:
        raise GridError(f"--grid {spec!r}: {e}") from None
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
    Names: `name_key=value_key=value` with short keys; GridError on bad names or keys (duplicate
    variants are refused by `resolve_variants`, which compares their configs)."""
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
    return out
