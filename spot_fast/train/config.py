"""What a training run is: `TrainConfig` (the run) and the resolution of the model's `SPOTConfig`
from the preset, the cache's encoder geometry and the `--set a.b=v` overrides.

    tcfg = TrainConfig(stage=1, cache="runs/cache", preset="coco", overrides={"slot_attention.num_slots": "6"})
    cfg = model_config(tcfg, encoder_from_manifest(manifest))
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field

from spot_fast.config import EncoderConfig, SPOTConfig, preset


class TrainError(Exception):
    """A problem the user can fix: bad option, a cache or teacher that does not fit, a changed resume."""


PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    stage: int = 1                      # 1: slot attention + decoder on frozen features; 2: self-training
    cache: str | None = None            # folder of a `cache ... --split both` build (train/ and val/ inside)
    train_cache: str | None = None      # a train cache on its own (instead of cache/train)
    val_cache: str | None = None        # a val cache on its own (instead of cache/val)
    images: str | None = None           # dataset root: run the frozen encoder on the fly instead of a cache
    dataset: str = "coco"               # dataset name of `images` (coco, voc, movi, folder, synthetic)
    weights: str | None = None          # `images` / predict: encoder weights file (None: local HF/hub cache)
    out: str = "runs/spot"              # run folder: config.json, log.jsonl, checkpoints/, eval/
    preset: str = "coco"                # model hyper-parameters and optimiser defaults (spot_fast.config)
    overrides: dict[str, str] = field(default_factory=dict)  # "a.b" -> "v" for any SPOTConfig field
    teacher: str | None = None          # stage 2: spot-fast run folder / checkpoint, or a reference .pth
    epochs: int | None = None           # None: the preset's
    batch_size: int | None = None       # per rank; None: the preset's
    lr: float | None = None             # peak learning rate; None: the preset's
    seed: int = 0                       # data order, slot noise and patch orders are functions of it
    precision: str = "auto"             # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False               # torch.compile the model
    log_every: int = 50                 # steps between log lines (the only host syncs of the loop)
    checkpoint_every: int = 0           # steps between checkpoints (0: at the end of every epoch)
    keep_last: int = 3                  # step checkpoints kept (plus best.pt)
    resume: bool = False                # continue from the newest checkpoint in `out`
    allow_random_init: bool = False     # accept a cache / encoder built from random weights (tests, demo)
    device: str | None = None           # None: cuda:LOCAL_RANK if available, else cpu
    drop_last: bool = True              # drop the last short global batch of every epoch (as the reference)
    max_steps: int = 0                  # stop after this many optimiser steps (0: all epochs)
    eval_batch_size: int = 64           # batch size of the validation passes
    progress: bool = True               # rich progress bar on rank 0

    def validate(self) -> None:
        checks = [
            (self.stage in (1, 2), f"--stage must be 1 or 2, got {self.stage}"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            (self.epochs is None or self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size is None or self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr is None or self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
            (self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}"),
            (self.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {self.checkpoint_every}"),
            (self.keep_last >= 1, f"--keep-last must be >= 1, got {self.keep_last}"),
            (self.max_steps >= 0, f"--max-steps must be >= 0, got {self.max_steps}"),
            (self.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {self.eval_batch_size}"),
            ((self.cache is not None) + (self.train_cache is not None) + (self.images is not None) == 1,
             "give exactly one of --cache, --train-cache or --images"),
            (self.stage == 1 or self.teacher is not None, "stage 2 needs --teacher (a stage-1 run or checkpoint)"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainError(message)
        check_preset(self.preset)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Keys that may change between a run and its --resume (they do not change the numbers).
RESUME_FREE = ("resume", "log_every", "keep_last", "checkpoint_every", "compile", "device", "progress",
               "eval_batch_size", "max_steps")


def check_preset(name: str) -> None:
    try:
        preset(name)
    except ValueError as e:
        raise TrainError(f"--preset: {e}") from None


# ----------------------------------------------------------------------------- overrides

def config_keys(cls=SPOTConfig, prefix: str = "") -> dict[str, type]:
    """Every settable leaf of the config as "a.b" -> its type."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out.update(config_keys(t, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = t
    return out


def parse_value(key: str, text: str, t) -> object:
    """`text` as a value of type `t` (int, float, bool, str, or X | None)."""
    args = typing.get_args(t)
    if type(None) in args:
        if text.lower() in ("none", "null"):
            return None
        t = next(a for a in args if a is not type(None))
    try:
        if t is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if t is int:
            return int(text)
        if t is float:
            return float(text)
        return str(text)
    except ValueError:
        raise TrainError(f"--set {key}={text}: expected a value of type {getattr(t, '__name__', t)}") from None


def apply_overrides(cfg: SPOTConfig, overrides: dict[str, str]) -> SPOTConfig:
    """The config with every "a.b" -> "v" set, type-checked against the dataclass fields."""
    keys = config_keys()
    values: dict[str, dict] = {}
    for key, text in overrides.items():
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; keys: {', '.join(sorted(keys))}"
            raise TrainError(f"--set {key}: no such config field{hint}")
        group, _, name = key.rpartition(".")
        values.setdefault(group, {})[name] = parse_value(key, text, keys[key])
    changes = {}
    try:
        for group, kv in values.items():
            if group:
                changes[group] = dataclasses.replace(getattr(cfg, group), **kv)
            else:
                changes.update(kv)
        return dataclasses.replace(cfg, **changes)
    except ValueError as e:
        raise TrainError(f"--set: {e}") from None


# ----------------------------------------------------------------------------- the model config

def encoder_from_manifest(manifest: dict, split_block: int) -> EncoderConfig:
    """The encoder geometry a cache was built with; `split_block` where the cache stores none."""
    e = manifest["encoder"]
    stored = manifest["layers"]["split_block"]
    return EncoderConfig(name=e["name"], image_size=e["image_size"], patch_size=e["patch_size"],
                         embed_dim=e["embed_dim"], depth=e["depth"], num_heads=e["num_heads"],
                         mlp_ratio=e["mlp_ratio"], split_block=split_block if stored is None else stored)


def model_config(tcfg: TrainConfig, manifest: dict | None = None) -> SPOTConfig:
    """preset(stage) -> the cache's encoder geometry (if any) -> --set overrides -> --epochs/--batch-size/--lr."""
    cfg = preset(tcfg.preset, stage=tcfg.stage)
    if manifest is not None:
        cfg = dataclasses.replace(cfg, encoder=encoder_from_manifest(manifest, cfg.encoder.split_block))
    cfg = apply_overrides(cfg, tcfg.overrides)
    optim = {k: v for k, v in (("epochs", tcfg.epochs), ("batch_size", tcfg.batch_size), ("lr", tcfg.lr))
             if v is not None}
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, **optim))


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
