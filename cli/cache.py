"""`spot-fast cache ...`: build, inspect and verify feature caches.

    spot-fast cache coco --root /data/coco --split both --split-block 8
    spot-fast cache synthetic --root DIR --preset tiny --random-init --out DIR2
    torchrun --nproc-per-node 8 --no-python spot-fast cache coco --root /data/coco
    spot-fast cache info PATH
    spot-fast cache verify PATH

Errors a user can cause print one line and exit with code 2 (see cli/errors.py); Ctrl-C during a
build keeps the finished shards and says how to resume.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Optional

import typer

from spot_fast.cli.errors import at_least, on_interrupt
from spot_fast.cli.help import Command, Group

app = typer.Typer(no_args_is_help=True, cls=Group)

DATASETS = ("coco", "voc", "movi", "folder", "synthetic")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _say(message: str) -> None:
    if _rank() == 0:
        typer.echo(message)


def _parse_options(dataset: str, options: list[str]) -> dict:
    """["num_crops=4", "seed=0"] -> {"num_crops": 4, "seed": 0} (ints, floats, true/false, else str)."""
    from spot_fast.cache import CacheError
    from spot_fast.data.sources import source_options
    accepted = source_options(dataset)
    out = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CacheError(f"-o {item!r}: write it as KEY=VALUE")
        if key not in accepted:
            raise CacheError(f"-o {item}: dataset {dataset} has no option {key!r}; it takes "
                             f"{', '.join(accepted) or 'none'}")
        for cast in (int, float):
            with contextlib.suppress(ValueError):
                value = cast(value)
                break
        if value in ("true", "false"):
            value = value == "true"
        out[key] = value
    return out


def _encoder_config(preset_name: str | None, encoder: str | None, image_size: int | None):
    from spot_fast.cache import CacheError
    from spot_fast.config import EncoderConfig, preset
    try:
        cfg = preset(preset_name).encoder if preset_name else EncoderConfig()
        if encoder is not None:
            cfg = dataclasses.replace(cfg, name=encoder)
        if image_size is not None:
            cfg = dataclasses.replace(cfg, image_size=image_size)
        cfg.spec    # validates the name
    except ValueError as e:
        raise CacheError(f"{e} (--preset/--encoder)") from None
    if cfg.image_size % cfg.spec.patch_size:
        raise CacheError(f"--image-size {cfg.image_size} is not a multiple of the patch size {cfg.spec.patch_size}")
    return cfg


def _device(name: str):
    """--device as a torch.device, refused up front when it is not one or not present."""
    import torch

    from spot_fast.cache import CacheError
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CacheError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CacheError(f"--device {name}: this machine has no CUDA device; use --device cpu")
    return dev


def _build(dataset: str, root: Path, split: str, out: Path | None, preset_name: str | None,
           encoder: str | None, image_size: int | None, split_block: int | None, device: str | None,
           options: list[str], threads: int | None, **settings) -> None:
    """The command's flags -> CacheBuildConfig -> build_splits; one report line per split."""
    from spot_fast.cache import CacheBuildConfig, CacheError, build_splits
    from spot_fast.data.sources import SOURCES
    from spot_fast.threads import configure_threads
    configure_threads(threads)
    if split not in ("train", "val", "both"):
        raise CacheError(f"--split must be train, val or both, got {split!r}")
    has = SOURCES[dataset].SPLITS
    missing = [s for s in (["train", "val"] if split == "both" else [split]) if s not in has]
    if missing:
        raise CacheError(f"--split {split}: dataset {dataset} has no {' or '.join(missing)} split (it has no "
                         f"ground truth); use --split {' '.join(has)}")
    if settings["random_init"] and settings["weights"] is not None:
        raise CacheError(f"--weights {settings['weights']} and --random-init exclude each other: pass one of them")
    cfg = _encoder_config(preset_name, encoder, image_size)
    if split_block is None and preset_name:       # a preset's cache feeds that preset's stage 2
        split_block = cfg.split_block
    build = CacheBuildConfig(dataset, root, split=split, out=out, encoder=cfg, split_block=split_block,
                             device=str(_device(device)) if device else None,
                             source_options=_parse_options(dataset, options), **settings)
    for done in build_splits(build, say=_say, warn=_warn).values():
        if done.result is not None:
            _report(done.result)


def _warn(message: str) -> None:
    if _rank() == 0:
        typer.secho(f"WARNING: {message}", fg="yellow", bold=True, err=True)


def _report(result) -> None:
    from spot_fast.cache import CacheError
    if result.manifest is None:     # ranks > 0
        return
    counts = result.manifest["counts"]
    rate = result.images_built / max(result.seconds, 1e-9)
    views = result.manifest["views"]
    _say(f"cached {counts['images']} images ({views} view{'s' if views > 1 else ''} each) in {result.path} "
         f"[{result.images_built} encoded now, {rate:.1f} img/s, {result.seconds:.1f}s"
         + (f"; {result.shards_resumed} shards resumed from an earlier run" if result.shards_resumed else "") + "]")
    skipped = result.manifest["skipped"]
    if skipped:
        _warn(f"skipped {len(skipped)} unreadable images (listed in the manifest):")
        for s in skipped[:10]:
            _say(f"  {s['path']}: {s['reason']}")
        if len(skipped) > 10:
            _say(f"  ... and {len(skipped) - 10} more")
    if counts["images"] == 0:
        raise CacheError(f"none of the {counts['source_images']} images could be read, so {result.path} holds "
                         f"no features: fix --root, then delete {result.path} and rerun")


def _options_help(dataset: str) -> str:
    from spot_fast.data.sources import source_options
    accepted = source_options(dataset)
    listed = ", ".join(f"{k}={v}" for k, v in accepted.items()) or "none"
    return f"Dataset option KEY=VALUE, repeatable. {dataset} takes (defaults shown): {listed}."


def _make_build_command(dataset: str):
    def command(
        ctx: typer.Context,
        root: Path = typer.Option(..., help="Dataset root directory."),
        split: str = typer.Option("train" if dataset == "folder" else "both",
                                  help="train | val | both (both: --out DIR gets DIR/train, DIR/val)."
                                  + (" A folder has only train." if dataset == "folder" else "")),
        out: Optional[Path] = typer.Option(None, help="Cache directory (default: $SPOT_FAST_CACHE_DIR/"
                                           "<dataset>-<split>-<encoder>-<hash12>, base ~/.cache/spot-fast)."),
        preset: Optional[str] = typer.Option(None, help="Take the encoder config of this preset (e.g. tiny), "
                                             "its split block included (unless --split-block)."),
        encoder: Optional[str] = typer.Option(None, help="Encoder name (default dino_vitb16)."),
        image_size: Optional[int] = typer.Option(None, callback=at_least(1), help="Input resolution, a "
                                                 "multiple of the patch size (default 224)."),
        weights: Optional[Path] = typer.Option(None, help="Encoder weights file (default: the local HF / "
                                               "torch-hub cache)."),
        random_init: bool = typer.Option(False, "--random-init", metavar="",
                                         help="Random weights (tests/demo; the cache is marked random-init "
                                         "and refused by training by default)."),
        seed: int = typer.Option(0, callback=at_least(0), help="Seed of --random-init (>= 0)."),
        format: str = typer.Option("zarr", "--format", help="zarr | wds"),
        split_block: Optional[int] = typer.Option(None, callback=at_least(0), help="Also store the tokens "
                                                  "entering this block and the frozen tail weights (stage 2; "
                                                  "SPOT: 8)."),
        dtype: str = typer.Option("fp16", help="Token storage: fp16 | bf16 | fp32 | fp8 | int8 (8-bit: one "
                                  "float32 scale per token, ~0.5x the bytes of fp16; see `cache info` for the error)."),
        compress: Optional[str] = typer.Option(None, help="zarr compression: zstd or zstd:<level>."),
        chunk_images: int = typer.Option(64, callback=at_least(1),
                                         help="Images per shard (zarr chunk / tar), >= 1."),
        mask_size: int = typer.Option(320, callback=at_least(1), help="Ground-truth mask resolution (val), >= 1."),
        mask_dtype: str = typer.Option("uint8", help="Mask storage: uint8 | int16."),
        batch_size: int = typer.Option(64, callback=at_least(1), help="Images per encoder forward, >= 1."),
        num_workers: Optional[int] = typer.Option(None, callback=at_least(0), help="DataLoader workers "
                                                  "decoding images (default: min(4, usable cores))."),
        device: Optional[str] = typer.Option(None, help="cpu | cuda | cuda:N (default: cuda if present)."),
        autocast: Optional[str] = typer.Option(None, help="Run the encoder under autocast: bf16 | fp16."),
        option: list[str] = typer.Option([], "--option", "-o", metavar="KEY=VALUE", help=_options_help(dataset)),
        progress: bool = typer.Option(True, metavar="", help="Show the progress bar."),
        threads: Optional[int] = typer.Option(None, callback=at_least(1), help="Intra-op threads of the "
                                              "encoder (default: the usable cores)."),
    ):
        on_interrupt(ctx, "finished shards are kept: rerun the same command to resume")
        _build(dataset, root, split, out, preset, encoder, image_size, split_block, device, option, threads,
               weights=weights, random_init=random_init, seed=seed, format=format, dtype=dtype,
               compression=compress, chunk_images=chunk_images, mask_size=mask_size, mask_dtype=mask_dtype,
               batch_size=batch_size, num_workers=num_workers, autocast=autocast, progress=progress)

    command.__doc__ = f"Encode {dataset} images once with the frozen ViT and store the tokens."
    return command


for _name in DATASETS:
    app.command(_name, cls=Command)(_make_build_command(_name))


def _size(path: Path) -> str:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if total < 1024 or unit == "TB":
            return f"{total:.1f} {unit}" if unit != "B" else f"{total} B"
        total /= 1024


def _views_row(m: dict) -> str:
    """Views stored per image and how they were made (a val cache stores the first view only)."""
    spec = m["views_spec"]
    names = spec.get("views", "")
    names = ", ".join(names) if isinstance(names, list) else names
    extra = "".join(f"; {k} {spec[k]}" for k in ("num_crops", "seed", "frames_per_clip") if k in spec)
    note = " (val: the first view only)" if spec.get("num_views", m["views"]) != m["views"] else ""
    return f"{m['views']}{note}: {names}{extra}; {spec.get('rule', '')}"


def _ground_truth_note(spec: dict) -> str:
    gt = spec.get("ground_truth")
    if gt is None:
        return ""
    text = f"; {gt['annotations']} annotations, {gt['images_with_objects']} of {gt['images']} images with objects"
    return f"[red]{text}: EMPTY GROUND TRUTH[/red]" if gt["images_with_objects"] == 0 else text


def _bytes_per_image(m: dict) -> str:
    """Token bytes per image as stored (scales included; before any compression)."""
    import numpy as np
    tokens = ("features", "split_tokens", "features_scale", "split_tokens_scale")
    total = sum(int(np.prod(a["shape"][1:])) * np.dtype(a["dtype"]).itemsize
                for name, a in m["arrays"].items() if name in tokens)
    return f"{total:,} token bytes per image ({m['views']} view{'s' if m['views'] > 1 else ''}, scales included)"


def _error_rows(m: dict) -> list[tuple[str, str]]:
    """The stored tokens' error against the encoder's fp32 output, and stage-2 tail consistency."""
    errors = m.get("stored_error")
    if not errors:
        return [("stored error", "not recorded (built by an older spot-fast)")]
    names = {"final": "final tokens", "split": "split tokens"}
    rows = [(f"error {names[k]}", f"relative RMS {e['rel_rms']:.2e}, max |error| {e['max_abs']:.2e} "
             f"(max |value| {e['max_ref']:.3g}), worst token {e['max_token_rel']:.2e} relative")
            for k, e in errors.items() if k in names]
    if "tail" in errors:
        e = errors["tail"]
        rows.append(("tail consistency", f"frozen tail(stored split) vs stored final: relative RMS {e['rel_rms']:.2e}, "
                     f"max |difference| {e['max_abs']:.2e} ({e['tokens']} tokens measured)"))
    return rows


@app.command(cls=Command)
def info(path: Path = typer.Argument(..., help="Cache directory, or a --split both folder.")):
    """Print what a cache holds (its manifest) as a table; both splits of a --split both folder."""
    from spot_fast.cache.resolve import SPLITS
    from spot_fast.cache.manifest import MANIFEST
    if not (path / MANIFEST).is_file() and any((path / s / MANIFEST).is_file() for s in SPLITS):
        for s in SPLITS:
            if (path / s).exists():
                _info_table(path / s)
        return
    _info_table(path)


def _info_table(path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from spot_fast.cache import read_manifest
    m = read_manifest(path)
    e, c = m["encoder"], m["counts"]
    t = Table(title=f"spot-fast cache {path}", show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value")
    weights = m["weights"] + ("  [red]RANDOM-INIT: for tests only[/red]" if m["random_init"] else "")
    rows = [
        ("dataset", f"{m['dataset']} / {m['split']}  (root {m['root']})"
                    + (f"  options {m['source_options']}" if m["source_options"] else "")),
        ("format", m["format"] + (f", {m['compression']}" if m["compression"] else ", uncompressed")),
        ("encoder", f"{e['name']}" + (f" ({e['timm_name']})" if e["timm_name"] else "")
         + f", depth {e['depth']}, D={m['feature_dim']}"),
        ("weights", weights),
        ("resolution", f"{m['image_size']}px, patch {m['patch_size']}, grid {m['grid'][0]}x{m['grid'][1]} "
                       f"= {m['num_patches']} tokens (+{m['num_prefix_tokens']} prefix)"),
        ("views", _views_row(m)),
        ("layers", f"final: {m['layers']['final']}"
         + (f"; split block {m['layers']['split_block']}: {m['layers']['split_tokens']}"
            if m["layers"]["split_block"] is not None else "; no split-layer tokens")),
        ("dtype", f"{m['dtype']} (stored {m['stored_dtype']})" + (f", autocast {m['autocast']}" if m["autocast"] else "")),
        ("arrays", ", ".join(f"{k} {tuple(v['shape'])} {v['dtype']}" for k, v in m["arrays"].items())),
        ("images", f"{c['images']} stored of {c['source_images']}, {c['skipped']} skipped"),
        ("shards", f"{c['shards']} x {m['chunk_images']} images"),
        ("size", f"{_size(Path(path))} on disk; {_bytes_per_image(m)}"),
        *_error_rows(m),
        ("spot-fast", m["spot_fast_version"]),
        ("content key", m["content_key"]),
    ]
    if m["mask_size"]:
        rows.insert(8, ("masks", f"{m['mask_size']}x{m['mask_size']} {m['mask_dtype']} + {m['image_size']}px JPEG"
                        + _ground_truth_note(m["views_spec"])))
    for k, v in rows:
        t.add_row(k, v)
    for s in m["skipped"][:10]:
        t.add_row("skipped", f"{s['path']}: {s['reason']}")
    Console(width=max(100, Console().width)).print(t)


@app.command(cls=Command)
def verify(path: Path = typer.Argument(..., help="Cache directory.")):
    """Re-hash every file of a cache against its manifest; exit 1 naming any bad shard."""
    from spot_fast.cache import read_manifest
    from spot_fast.cache import verify as verify_cache
    from spot_fast.cache.manifest import all_checksums
    n = len(all_checksums(read_manifest(path)))
    problems = verify_cache(path)
    if problems:
        for p in problems:
            typer.echo(f"BAD {p}", err=True)
        typer.echo(f"error: {len(problems)} of {n} files of {path} failed verification: rebuild the cache "
                   f"(delete it and rerun its build command)", err=True)
        raise typer.Exit(1)
    typer.echo(f"ok: {n} files of {path} match their sha256")
