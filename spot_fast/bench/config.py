"""What `spot-fast bench` runs: `BenchConfig`, the one declaration of its options.

Every field is a `spot-fast bench` option (cli/bench.py generates them: the type, the bounds and
choices of `setting(...)` / `Literal`, the comment as help); `check_fields` holds each value to its
field where the config is made. `validate()` adds what needs the machine or the disk: the sections
asked for, a CUDA device, the cache (by the one `--cache PATH` rule, `spot_fast.cache.resolve_cache`)
and a reference checkout.

    cfg = BenchConfig(preset="tiny", sections=("stage1", "eval"), cache="caches/tiny")
    cfg.validate()
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from spot_fast.precision import cpu_bf16_native
from spot_fast.config import PRESETS, preset
from spot_fast.errors import UserError
from spot_fast.fields import check_fields, setting

SECTIONS = ("stage1", "stage2", "eval", "data", "contended", "sweep")
DEFAULT_SECTIONS = ("stage1", "stage2", "eval", "data")


class BenchError(UserError, ValueError):
    """A bad bench option; the message names it and the fix."""


@dataclass
class BenchConfig:
    # model shapes (coco: ViT-B/16, 196 tokens, 768 wide, 7 slots)
    preset: str = setting("coco", choices=tuple(PRESETS))
    batch: int | None = setting(None, min=1)    # images per step (default: 64 on GPU, 8 on CPU)
    device: Literal["auto", "cpu", "cuda"] = "auto"     # where the rows run (auto: CUDA when there is one)
    # a feature cache or a --split both folder to read (default: one of the preset's shape is built
    # in a temporary folder)
    cache: str | None = None
    # comma-separated subset of stage1,stage2,eval,data,contended,sweep
    sections: tuple[str, ...] = DEFAULT_SECTIONS
    warmup: int = setting(1, min=0)             # untimed calls per row before timing
    repeats: int | None = setting(None, min=1)  # timed calls per row (default: 10 on GPU, 3 on CPU)
    compile: Literal["auto", "on", "off"] = "auto"      # torch.compile the fast rows (auto: on GPU only)
    # the fast rows' precision; both: an fp32 and a bf16 row; auto: bf16 on GPU, on a CPU fp32 and
    # bf16 beside it where the CPU multiplies bf16 natively (AVX512-BF16, AMX)
    precision: Literal["auto", "bf16", "fp32", "both"] = "auto"
    # torch CPU threads (default: the thread policy: the usable cores, one for small work)
    threads: int | None = setting(None, min=1)
    # a checkout of the SPOT reference repository: its own code runs the reference rows (default:
    # spot-fast's transcription)
    reference_repo: str | None = None
    loader_workers: int = setting(4, min=0)     # the reference loader's workers (the reference's 4)
    # evaluation mask resolution (default: 320, the reference's, at 224 px; the image size below)
    mask_size: int | None = setting(None, min=1)
    data_batches: int = setting(8, min=1)       # batches read for the data rates and the data-wait share
    sweep_variants: int = setting(4, min=2)     # section sweep: variants per grid (slot-count and lr grids)
    sweep_steps: int = setting(24, min=1)       # section sweep: optimiser steps per variant
    out: str | None = None          # JSON folder (default: ./bench-results)
    save: bool = True               # write the JSON result

    def __post_init__(self):
        check_fields(self)

    def validate(self, cli: bool = False) -> None:
        """Raise BenchError naming what the machine or the disk refuses: a section, CUDA, the cache,
        the reference checkout (each field's own values are checked when the config is made).
        cli: name the options as `spot-fast bench` spells them (`--sections`), else the arguments."""
        bad = [s for s in self.sections if s not in SECTIONS]
        if bad or not self.sections:
            raise BenchError(f"--sections must be a comma-separated subset of {','.join(SECTIONS)}, got {bad or 'none'}"
                             if cli else f"sections must be a non-empty tuple of {SECTIONS}, got {self.sections!r}")
        if self.device == "cuda":
            import torch
            if not torch.cuda.is_available():
                raise BenchError("--device cuda: no CUDA device here; use --device cpu (or auto)" if cli else
                                 "device='cuda': no CUDA device here; use device='cpu' (or 'auto')")
        if self.cache is not None:
            from spot_fast.bench.fixtures import check_cache
            train, val = bench_caches(self.cache, need_val="eval" in self.sections, cli=cli)
            check_cache(train, preset(self.preset), split_tokens="stage2" in self.sections, cli=cli)
            if val is not None:
                check_cache(val, preset(self.preset), split_tokens=True, cli=cli)
        if self.reference_repo is not None:
            from spot_fast.bench.reference.client import check_repo
            check_repo(self.reference_repo, option="--reference-repo" if cli else "reference_repo=")

    def resolved(self) -> "BenchConfig":
        """The defaults that depend on the machine and the preset filled in."""
        import torch
        dev = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        gpu = dev.startswith("cuda")
        size = preset(self.preset).encoder.image_size
        return replace(self, device=dev, batch=self.batch or (64 if gpu else 8),
                       repeats=self.repeats or (10 if gpu else 3),
                       compile=("on" if gpu else "off") if self.compile == "auto" else self.compile,
                       precision=self.precision if self.precision != "auto" else
                       "bf16" if gpu else "both" if cpu_bf16_native() else "fp32",
                       mask_size=self.mask_size or (320 if size >= 224 else size))

    @property
    def precisions(self) -> tuple[str, ...]:
        """The fast rows' precisions, one row each (after `resolved`)."""
        return ("fp32", "bf16") if self.precision == "both" else (self.precision,)


def bench_caches(path: str | Path, need_val: bool, cli: bool = False) -> tuple[Path, Path | None]:
    """(train cache, val cache or None) of `--cache PATH`, by `spot_fast.cache.resolve_cache`: a
    `--split both` folder gives both; a cache of one split feeds the training and data rows (a
    timing reads any split), and is refused with the bench's own fix when the eval section needs
    a val cache. cli: the message names options (`--cache`), else arguments (`cache=`)."""
    from spot_fast.cache import resolve_cache
    from spot_fast.cache.manifest import MANIFEST, read_manifest
    path = Path(path)
    if (path / MANIFEST).is_file():
        if need_val:
            raise BenchError(f"--cache {path}: the eval section needs a val cache (masks): pass a --split both "
                             f"folder, or leave eval out of --sections" if cli else
                             f"cache={str(path)!r}: the eval section needs a val cache (masks): pass a --split "
                             f"both folder, or leave 'eval' out of sections")
        split = read_manifest(path).get("split")
        return resolve_cache(path, split if split in ("train", "val") else "train", cli=cli), None
    # val first: a folder missing one split is refused naming the split to build, not another option
    val = resolve_cache(path, "val", cli=cli) if need_val else None
    return resolve_cache(path, "train", cli=cli), val
