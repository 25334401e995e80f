"""Commands printed as advice, written so that they run as printed.

    cache_command(manifest, "runs/cache/train-split2", preset="tiny", split_block=2)
    # 'spot-fast cache synthetic --root data --split train --preset tiny --random-init --seed 0
    #  --split-block 2 --out runs/cache/train-split2'

A command is built from what a cache's manifest records, so it rebuilds the same cache (with the
changes asked for); where the manifest does not say enough to do that (an encoder file whose path
was not recorded, the demo's own encoder), the answer is None and the caller says what to do instead.
"""
from __future__ import annotations

import re
import shlex

from spot_fast.config import PRESETS, preset as get_preset

_GEOMETRY = ("name", "image_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
_RANDOM = re.compile(r"^random-init:(\d+)$")
# manifest key -> (cache option, its default in `spot-fast cache`)
_STORAGE = {"format": ("--format", "zarr"), "dtype": ("--dtype", "fp16"), "compression": ("--compress", None),
            "chunk_images": ("--chunk-images", 64), "mask_dtype": ("--mask-dtype", None),
            "autocast": ("--autocast", None)}


def _same_encoder(preset_name: str, encoder: dict) -> bool:
    """The preset's ViT has this geometry, the input size aside (`--image-size` sets that)."""
    enc = get_preset(preset_name).encoder
    return all(encoder.get(k) == getattr(enc, k) for k in _GEOMETRY
               if k != "image_size" and (k in encoder or k == "name"))


def encoder_args(encoder: dict, preset: str | None = None) -> list[str] | None:
    """Options of `spot-fast cache` that build this encoder geometry: `--preset` (the given one
    first; `--image-size N` where the preset's differs) for a custom ViT, `--encoder NAME
    --image-size N` for a named one; None if none can."""
    if encoder["name"] != "custom":
        return ["--encoder", encoder["name"], "--image-size", str(encoder["image_size"])]
    for name in ([preset] if preset in PRESETS else []) + sorted(PRESETS):
        if _same_encoder(name, encoder):
            size = encoder["image_size"]
            return ["--preset", name] + (["--image-size", str(size)] if size != get_preset(name).encoder.image_size
                                         else [])
    return None


def cache_command(manifest: dict, out, *, preset: str | None = None, **changes) -> str | None:
    """The `spot-fast cache` command that builds the cache `manifest` describes into `out`, with
    `changes` (split, split_block, dtype, ...: manifest keys); None when the manifest cannot say how."""
    enc = encoder_args(manifest["encoder"], preset)
    weights = _RANDOM.match(str(manifest["weights"]))
    if enc is None or not weights:
        return None          # a weights file (only its sha256 is recorded) or the demo's encoder
    split = changes.pop("split", manifest["split"])
    args = ["spot-fast", "cache", manifest["dataset"], "--root", str(manifest["root"]), "--split", split,
            *enc, "--random-init", "--seed", weights.group(1)]
    settings = {**{k: manifest.get(k) for k in _STORAGE}, "mask_size": manifest.get("mask_size"),
                "split_block": manifest["layers"]["split_block"], **changes}
    for key, (option, default) in _STORAGE.items():
        if settings[key] is not None and settings[key] != default:
            args += [option, str(settings[key])]
    if settings["mask_size"] is not None:
        args += ["--mask-size", str(settings["mask_size"])]
    if settings["split_block"] is not None:
        args += ["--split-block", str(settings["split_block"])]
    for key, value in sorted(manifest.get("source_options", {}).items()):
        args += ["-o", f"{key}={value}"]
    return shlex.join([*args, "--out", str(out)])
