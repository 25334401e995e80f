"""What a training run is: `TrainConfig` (the run) and the resolution of the model's `SPOTConfig`
from the preset, the cache's encoder geometry and the overrides (`--set a.b=v`, the model flags).

    tcfg = TrainConfig(stage=1, cache="runs/cache", preset="coco", overrides={"slot_attention.num_slots": 6})
    tcfg.validate()                                   # every value, before anything is built
    cfg = model_config(tcfg, manifest)                # manifest: the cache's manifest.json (or None)

Precedence, one rule: preset < the cache's encoder < epochs / batch_size / lr < overrides (the more
specific `--set` wins over a flag; the CLI says so when both are given).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Literal

from spot_fast.config import PRESETS, EncoderConfig, SPOTConfig, preset
from spot_fast.data import DATASET_NAMES
from spot_fast.errors import UserError, arg
from spot_fast.fields import ConfigError, check_fields, parse_text, setting, type_hints


class TrainError(UserError):
    """A problem the user can fix: bad option, a cache or teacher that does not fit, a changed resume."""


class OverrideError(TrainError):
    """An override (`--set key=value`, a model flag, a sweep variant) the config does not take."""

    def __init__(self, key: str, value, problem: str):
        self.key, self.value, self.problem = key, value, problem
        where = f"--set {key}={value}" if isinstance(value, str) and "." in key else arg(key, value)
        super().__init__(f"{where}: {problem}")


# SPOTConfig fields a TrainConfig field of the same name sets (None there: the preset's value).
SHADOWED = {"optim.epochs": "epochs", "optim.batch_size": "batch_size", "optim.lr": "lr"}
MAX_SEED = 2**63 - 1
_DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+|mps)$")


@dataclass
class TrainConfig:
    stage: Literal[1, 2] = 1            # 1: slot attention + decoder on frozen features; 2: self-training
    cache: str | None = None            # folder of a `cache ... --split both` build (train/ and val/ inside)
    train_cache: str | None = None      # a train cache on its own (instead of cache/train)
    val_cache: str | None = None        # a val cache on its own (instead of cache/val)
    stream: str | None = None           # WebDataset shard URLs (brace pattern) of the train cache to stream
    images: str | None = None           # dataset root: run the frozen encoder on the fly instead of a cache
    dataset: str = setting("coco", choices=DATASET_NAMES)  # dataset of `images`
    weights: str | None = None          # `images`: encoder weights file or "random-init" (None: local HF/hub cache)
    out: str = "runs/spot"              # run folder: config.json, log.jsonl, checkpoints/, eval/
    preset: str = setting("coco", choices=tuple(PRESETS))  # model hyper-parameters and optimiser defaults
    overrides: dict[str, object] = field(default_factory=dict)  # "a.b" -> value (or its text) for any SPOTConfig field
    teacher: str | None = None          # stage 2: spot-fast run folder / checkpoint, or a reference .pth
    epochs: int | None = setting(None, min=1)       # None: the preset's
    batch_size: int | None = setting(None, min=1)   # per rank; None: the preset's
    lr: float | None = setting(None, above=0)       # peak learning rate; None: the preset's
    seed: int = setting(0, min=0, max=MAX_SEED)     # data order, slot noise and patch orders are functions of it
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto (bf16 on CUDA; on a CPU bf16 only for large steps on native-bf16 CPUs: spot_fast.precision) | bf16 | fp32
    compile: bool = False               # torch.compile the model
    log_every: int = setting(50, min=1)     # steps between log lines (each syncs the host with the device)
    checkpoint_every: int = setting(0, min=0)   # steps between checkpoints (0: at the end of every epoch)
    keep_last: int = setting(3, min=1)  # step checkpoints kept (plus best.pt)
    resume: bool = False                # continue from the newest checkpoint in `out`
    allow_random_init: bool = False     # accept a cache / encoder built from random weights (tests, demo)
    device: str | None = None           # cpu | cuda | cuda:N (None: cuda:LOCAL_RANK if available, else cpu)
    drop_last: bool = True              # drop the last short global batch of every epoch (as the reference)
    max_steps: int = setting(0, min=0)  # stop after this many optimiser steps (0: all epochs)
    eval_batch_size: int = setting(64, min=1)   # batch size of the validation passes
    progress: bool = True               # rich progress bar on rank 0
    threads: int | None = setting(None, min=1)  # intra-op CPU threads (None: spot_fast.threads policy)

    def validate(self) -> None:
        """Every field, then the run as a whole, then the model config it resolves to (without the
        cache): a TrainError naming the argument (its flag on the command line) and the fix."""
        try:
            check_fields(self)
        except ConfigError as e:
            raise TrainError(f"{arg(e.key)} {e.problem}") from None
        sources = [arg(k) for k in ("cache", "train_cache", "images")]
        checks = [
            ((self.cache is not None) + (self.train_cache is not None) + (self.images is not None) == 1,
             f"give exactly one of {', '.join(sources[:2])} or {sources[2]}"),
            (self.stage == 1 or self.teacher is not None,
             f"stage 2 needs {arg('teacher')} (a stage-1 run or checkpoint)"),
            (self.stage == 2 or self.teacher is None,
             f"{arg('teacher')} is for stage 2 (stage 1 has no teacher): drop it, or give {arg('stage', 2)}"),
            ("stage" not in self.overrides,
             f"an override cannot set the stage: give {arg('stage', 2)} (it picks the preset's stage-2 model)"),
            (self.stream is None or self.images is None,
             f"{arg('stream')} needs the train cache's manifest: give {sources[0]} or {sources[1]} (a copy of the "
             f"manifest folder is enough), not {sources[2]}"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainError(message)
        check_device(self.device)
        model_config(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_device(name: str | None, option: str = "device") -> None:
    """TrainError unless `name` is None, cpu, or a device this machine has (cuda, cuda:N, mps)."""
    if name is None:
        return
    if not _DEVICE.match(name):
        raise TrainError(f"{arg(option, name)}: not a device; use cpu, cuda or cuda:N")
    import torch
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            have = f"{count} CUDA device(s) (cuda:0..cuda:{count - 1})" if count else "no CUDA device"
            raise TrainError(f"{arg(option, name)}: this machine has {have}; use {arg(option, 'cpu')}"
                             + (f" or {arg(option, 'cuda:0')}" if count else ""))
    if name == "mps" and not torch.backends.mps.is_available():
        raise TrainError(f"{arg(option, name)}: MPS is not available here; use {arg(option, 'cpu')}")


# Keys that may change between a run and its --resume (they do not change the numbers).
RESUME_FREE = ("resume", "log_every", "keep_last", "checkpoint_every", "compile", "device", "progress",
               "eval_batch_size", "max_steps")


# ----------------------------------------------------------------------------- overrides

def config_keys(cls=SPOTConfig, prefix: str = "") -> dict[str, object]:
    """Every settable leaf of the config as "a.b" -> its type hint."""
    hints = type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out.update(config_keys(t, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = t
    return out


def parse_value(key: str, text: str, t) -> object:
    """`text` as a value of type `t` (int, float, bool, str, a Literal, or X | None)."""
    try:
        return parse_text(text, t)
    except ValueError as e:
        raise OverrideError(key, text, str(e)) from None


def unknown_key(key: str, keys) -> TrainError:
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"keys: {', '.join(sorted(keys))}"
    return TrainError(f"{arg(key)}: no such config field; {hint}")


def apply_overrides(cfg: SPOTConfig, overrides: dict[str, object], named: dict[str, str] | None = None,
                    encoder: EncoderConfig | None = None) -> SPOTConfig:
    """The config with `encoder` (if given) and every "a.b" -> value set (text is parsed by the
    field's type), each value checked by its dataclass and the whole config once at the end; an
    OverrideError names the override that caused a refusal (or the argument `named[key]` that
    gave it); a ConfigError that no override caused is raised as it is."""
    keys = config_keys()
    groups: dict[str, dict] = {}
    for key, value in overrides.items():
        if key not in keys:
            raise unknown_key(key, keys)
        group, _, name = key.rpartition(".")
        groups.setdefault(group, {})[name] = parse_value(key, value, keys[key]) if isinstance(value, str) else value
    try:
        changes = {} if encoder is None else {"encoder": encoder}
        for group, kv in groups.items():
            try:
                changes.update({group: dataclasses.replace(changes.get(group, getattr(cfg, group)), **kv)}
                               if group else kv)
            except ConfigError as e:
                raise e.within(group) from None
        return dataclasses.replace(cfg, **changes)
    except ConfigError as e:       # name the override that caused it (its own key, else its group's first)
        group = e.key.rpartition(".")[0]
        key = e.key if e.key in overrides else next((k for k in overrides if k.startswith(group)), None)
        if key is None:
            raise
        raise OverrideError((named or {}).get(key, key), overrides.get(key), str(e)) from None


def check_distinct_variants(configs: list[tuple[str, SPOTConfig]]) -> None:
    """TrainError when two variants of a sweep resolve to the same model config (`num_slots=5,5`,
    `num_slots=03,3`, `lr=1e-3,0.001`, a variant that repeats another or the base): each would train
    the same run twice. The one duplicate check of a sweep (`spot_fast.sweep.grid.resolve_variants`)."""
    seen: dict[str, str] = {}
    for name, cfg in configs:
        key = repr(cfg.to_dict())
        if key in seen:
            raise TrainError(f"variants {seen[key]!r} and {name!r} are the same config (their values are equal once "
                             f"parsed): drop one of them")
        seen[key] = name


# ----------------------------------------------------------------------------- the model config

def encoder_from_manifest(manifest: dict, split_block: int) -> EncoderConfig:
    """The encoder geometry a cache was built with; `split_block` where the cache stores none."""
    e = manifest["encoder"]
    stored = manifest["layers"]["split_block"]
    return EncoderConfig(name=e["name"], image_size=e["image_size"], patch_size=e["patch_size"],
                         embed_dim=e["embed_dim"], depth=e["depth"], num_heads=e["num_heads"],
                         mlp_ratio=e["mlp_ratio"], split_block=split_block if stored is None else stored)


def model_config(tcfg: TrainConfig, manifest: dict | None = None) -> SPOTConfig:
    """preset(stage) -> the cache's encoder geometry (if any) -> epochs/batch_size/lr -> overrides."""
    cfg = preset(tcfg.preset, stage=tcfg.stage)
    encoder = None if manifest is None else encoder_from_manifest(manifest, cfg.encoder.split_block)
    given = {key: getattr(tcfg, name) for key, name in SHADOWED.items() if getattr(tcfg, name) is not None}
    named = {key: name for key, name in SHADOWED.items() if key not in tcfg.overrides}
    try:
        return apply_overrides(cfg, {**given, **tcfg.overrides}, named=named, encoder=encoder)
    except ConfigError as e:        # the preset's model does not fit the cache's features
        if encoder is None:
            raise
        raise TrainError(f"{arg('preset', tcfg.preset)} does not fit this cache (encoder {encoder.name}, features "
                         f"{encoder.feature_dim} wide): {e}; use the preset the cache was built with, or set "
                         f"that field ({arg(e.key)})") from None


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != "overrides":
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out
