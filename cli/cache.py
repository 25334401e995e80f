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


@contextlib.contextmanager
def _resumable(out: Path):
    """A failed write during a build (disk full, permissions) -> one message saying how to resume."""
    from spot_fast.cache import CacheError
    try:
        yield
    except OSError as e:
        where = e.filename or out
        raise CacheError(f"cannot write the cache ({where}): {e.strerror or e}. Finished shards are kept: "
                         f"fix this (free space, permissions, or another --out) and rerun the same command "
                         f"to resume.") from e


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


def _splits(dataset: str, split: str) -> list[str]:
    """The splits to build, refused up front when the dataset lacks one (a folder has no val)."""
    from spot_fast.cache import CacheError
    from spot_fast.data.sources import SOURCES
    if split not in ("train", "val", "both"):
        raise CacheError(f"--split must be train, val or both, got {split!r}")
    wanted = ["train", "val"] if split == "both" else [split]
    has = SOURCES[dataset].SPLITS
    missing = [s for s in wanted if s not in has]
    if missing:
        raise CacheError(f"--split {split}: dataset {dataset} has no {' or '.join(missing)} split (it has no "
                         f"ground truth); use --split {' '.join(has)}")
    return wanted


def _build(dataset: str, root: Path, split: str, out: Path | None, preset_name: str | None,
           encoder: str | None, image_size: int | None, weights: Path | None, random_init: bool, seed: int,
           fmt: str, split_block: int | None, dtype: str, compress: str | None, chunk_images: int,
           mask_size: int, mask_dtype: str, batch_size: int, num_workers: int | None, device: str | None,
           autocast: str | None, options: list[str], progress: bool) -> None:
    from spot_fast.cache import CacheError, CacheSpec
    from spot_fast.cache.build import default_device, ranks_from_env
    from spot_fast.encoders import FrozenEncoder, resolve_weights

    if num_workers is None:
        num_workers = min(4, len(os.sched_getaffinity(0)))
    splits = _splits(dataset, split)
    cfg = _encoder_config(preset_name, encoder, image_size)
    source_options = _parse_options(dataset, options)
    if random_init and weights is not None:
        raise CacheError(f"--weights {weights} and --random-init exclude each other: pass one of them")
    resolved = resolve_weights(cfg, weights, random_init, seed)
    dev = _device(device) if device else default_device()
    ranks = ranks_from_env(dev)     # once for all splits; build_cache reuses the group
    try:
        todo = []       # every split is checked before any is encoded: a bad val never costs a train build
        for name in splits:
            spec = CacheSpec(dataset, str(root), name, cfg, resolved[1], split_block=split_block, dtype=dtype,
                             format=fmt, chunk_images=chunk_images, compression=compress, mask_size=mask_size,
                             mask_dtype=mask_dtype, autocast=autocast, source_options=source_options)
            path = spec.default_path() if out is None else (out / name if split == "both" else out)
            source = _open_split(spec, path)
            if source is not None:
                todo.append((spec, path, source))
        model = FrozenEncoder.create(cfg, seed=seed, resolved=resolved) if todo else None
        for spec, path, source in todo:
            _build_split(spec, path, source, model, batch_size, num_workers, dev, progress)
    finally:
        ranks.close()


def _open_split(spec, path: Path):
    """None when `path` already holds this cache; else the split's source, opened and checked
    (annotations, a sample of images), refused when `path` holds another cache."""
    from spot_fast.cache import find_cached
    from spot_fast.cache.paths import check_existing
    from spot_fast.data.sources import check_readable, open_source

    check_existing(spec, path)
    if find_cached(spec, path) is not None:
        _say(f"already cached: {path}")
        return None
    source = open_source(spec.dataset, spec.root, spec.split, image_size=spec.encoder.image_size,
                         mask_size=spec.mask_size, **spec.source_options)
    for warning in source.warnings:
        _warn(warning)
    check_readable(source)
    return source


def _build_split(spec, path: Path, source, model, batch_size: int, num_workers: int, device,
                 progress: bool) -> None:
    """Encode one split into `path`."""
    from spot_fast.cache import build_cache

    cfg = spec.encoder
    _say(f"caching {spec.dataset} {spec.split}: {len(source)} images, encoder {cfg.name} "
         f"({spec.weights_id[:19]}) -> {path}")
    with _resumable(path):
        result = build_cache(source, model, spec, path, batch_size=batch_size, num_workers=num_workers,
                             device=device, progress=progress)
    _report(result)


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
        preset: Optional[str] = typer.Option(None, help="Take the encoder config of this preset (e.g. tiny)."),
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
        dtype: str = typer.Option("fp16", help="Token storage: fp16 | bf16 | fp32."),
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
    ):
        on_interrupt(ctx, "finished shards are kept: rerun the same command to resume")
        _build(dataset, root, split, out, preset, encoder, image_size, weights, random_init, seed, format,
               split_block, dtype, compress, chunk_images, mask_size, mask_dtype, batch_size, num_workers,
               device, autocast, option, progress)

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


@app.command(cls=Command)
def info(path: Path = typer.Argument(..., help="Cache directory.")):
    """Print what a cache holds (its manifest) as a table."""
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
        ("size", _size(Path(path))),
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
