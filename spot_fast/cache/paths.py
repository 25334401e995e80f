"""What determines a cache's content (`CacheSpec`), its content key, and where it lives by default.

Default location: `$SPOT_FAST_CACHE_DIR/<dataset>-<split>-<encoder>-<key12>`, with
SPOT_FAST_CACHE_DIR defaulting to ~/.cache/spot-fast. The key hashes every field of the spec,
so the same command finds its finished cache again and a different one never collides with it.
One field is the dataset itself (`dataset_fingerprint`: every file's path, size and mtime), so a
dataset regenerated or edited under the same root is never mistaken for the cached one.
`check_existing` refuses a folder that holds another cache, naming the settings that differ.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from spot_fast.cache.codec import STORED_NUMPY
from spot_fast.cache.manifest import (BUILD_STATE, MANIFEST, MASK_DTYPES, SCHEMA_VERSION, SHARD_MARKERS,
                                      CacheError, read_manifest)
from spot_fast.config import EncoderConfig
from spot_fast.data.sources import SOURCES

FORMATS = ("zarr", "wds")
ZSTD_LEVELS = (-7, 22)      # the levels zstd offers (negative: its --fast modes)


def cache_base_dir() -> Path:
    """$SPOT_FAST_CACHE_DIR, else ~/.cache/spot-fast."""
    env = os.environ.get("SPOT_FAST_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spot-fast"


def encoder_description(cfg: EncoderConfig) -> dict:
    """The encoder fields that shape the cached tokens (named encoders ignore the custom fields).
    A custom encoder's sin-cos position table is recorded as "position": "sincos:<scale>"; the
    default learned table adds no key, so the keys of caches built before this field stay valid."""
    spec = cfg.spec
    d = {"name": cfg.name, "timm_name": spec.timm_name, "image_size": cfg.image_size,
         "patch_size": spec.patch_size, "embed_dim": spec.embed_dim, "depth": spec.depth,
         "num_heads": spec.num_heads, "num_registers": spec.num_registers, "mlp_ratio": spec.mlp_ratio}
    if cfg.position != "learned":
        d["position"] = f"{cfg.position}:{cfg.position_scale}"
    return d


@dataclass
class CacheSpec:
    """Everything that determines the bytes of a cache."""
    dataset: str                    # source name: coco | voc | movi | folder | synthetic
    root: str                       # dataset root (made absolute)
    split: str                      # "train" (all views) | "val" (1 view + masks + JPEG)
    encoder: EncoderConfig          # architecture and input resolution (its split_block is not used)
    weights_id: str                 # sha256 of the weights file, or "random-init:<seed>"
    split_block: int | None = None  # also store the tokens entering this block (stage 2); None: not
    dtype: str = "fp16"             # token storage: fp16 | bf16 (uint16 bits) | fp32
    format: str = "zarr"            # zarr (one v3 group) | wds (WebDataset tar shards)
    chunk_images: int = 64          # images per shard: one zarr chunk or one tar
    compression: str | None = None  # zarr only: None | "zstd" | "zstd:<level>"
    mask_size: int = 320            # ground-truth mask resolution (val)
    mask_dtype: str = "uint8"       # instance/class mask storage: uint8 | int16
    autocast: str | None = None     # run the encoder under torch.autocast: None | "bf16" | "fp16"
    source_options: dict = field(default_factory=dict)  # extra keyword options of open_source
    content: str | None = None      # dataset_fingerprint of the split's files; None: computed for the
                                    # known datasets (open_source names), else not keyed on the files

    def __post_init__(self):
        self.root = str(Path(self.root).expanduser().resolve())
        self.validate()
        if self.content is None and self.dataset in SOURCES:
            self.content = dataset_fingerprint(self.dataset, self.root, self.split)

    def validate(self) -> None:
        checks = [
            (self.split in ("train", "val"), f"split must be 'train' or 'val', got {self.split!r}"),
            (self.dtype in STORED_NUMPY, f"--dtype must be one of {sorted(STORED_NUMPY)}, got {self.dtype!r}"),
            (self.format in FORMATS, f"--format must be one of {FORMATS}, got {self.format!r}"),
            (self.mask_dtype in MASK_DTYPES, f"--mask-dtype must be one of {sorted(MASK_DTYPES)}, got {self.mask_dtype!r}"),
            (self.autocast in (None, "bf16", "fp16"), f"--autocast must be bf16 or fp16, got {self.autocast!r}"),
            (self.chunk_images >= 1, f"--chunk-images must be >= 1, got {self.chunk_images}"),
            (self.compression is None or self.format == "zarr",
             "--compress applies to --format zarr only (WebDataset shards are plain tar files)"),
        ]
        for ok, message in checks:
            if not ok:
                raise CacheError(message)
        self.zstd_level()   # validates the compression string
        depth = self.encoder.spec.depth
        if self.split_block is not None and not 0 <= self.split_block < depth:
            raise CacheError(f"--split-block {self.split_block} is outside the encoder's blocks 0..{depth - 1}")

    def zstd_level(self) -> int | None:
        if self.compression is None:
            return None
        name, _, level = self.compression.partition(":")
        if name != "zstd" or (level and not level.lstrip("-").isdigit()):
            raise CacheError(f"--compress must be 'zstd' or 'zstd:<level>', got {self.compression!r}")
        if level and not ZSTD_LEVELS[0] <= int(level) <= ZSTD_LEVELS[1]:
            raise CacheError(f"--compress {self.compression}: zstd levels run from {ZSTD_LEVELS[0]} (fastest) to "
                             f"{ZSTD_LEVELS[1]} (smallest); e.g. --compress zstd:3")
        return int(level) if level else 3

    @property
    def random_init(self) -> bool:
        return self.weights_id.startswith("random-init")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["encoder"] = encoder_description(self.encoder)
        return d

    def key(self) -> str:
        """sha256 of the canonical JSON of the spec (and the schema version)."""
        blob = json.dumps({"schema_version": SCHEMA_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def default_path(self) -> Path:
        return cache_base_dir() / f"{self.dataset}-{self.split}-{self.encoder.name}-{self.key()[:12]}"


def dataset_fingerprint(dataset: str, root: str | os.PathLike, split: str) -> str:
    """sha256 over (path relative to root, size, mtime_ns) of every file the split is made of
    (the source's `content_paths`; a missing one counts as missing). Stats only, no reads:
    about 20 us a file on a warm 2-core box (COCO train, 118k images: ~2.5 s)."""
    root = str(Path(root).expanduser().resolve())
    h = hashlib.sha256()
    for top in map(str, SOURCES[dataset].content_paths(Path(root), split)):
        if not os.path.exists(top):
            h.update(f"missing {top[len(root) + 1:]}\n".encode())
        for path in _files_under(top):
            st = os.stat(path)
            h.update(f"{path[len(root) + 1:]}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _files_under(top: str):
    """`top` if it is a file, else every file below it, in a fixed (sorted) order."""
    if os.path.isfile(top):
        yield top
        return
    for folder, subfolders, names in os.walk(top):
        subfolders.sort()
        yield from (os.path.join(folder, name) for name in sorted(names))


# CacheSpec field -> how the user sets it, for messages about settings that differ.
_OPTION_NAMES = {"dataset": "dataset", "root": "--root", "split": "--split", "weights_id": "weights",
                 "split_block": "--split-block", "dtype": "--dtype", "format": "--format",
                 "chunk_images": "--chunk-images", "compression": "--compress", "mask_size": "--mask-size",
                 "mask_dtype": "--mask-dtype", "autocast": "--autocast", "source_options": "-o options"}


def _recorded_spec(manifest: dict) -> dict:
    """The spec fields a finished cache's manifest records, named as in `CacheSpec.to_dict()`."""
    keys = ("dataset", "root", "split", "encoder", "dtype", "format", "chunk_images", "compression",
            "mask_size", "mask_dtype", "autocast", "source_options", "content")
    out = {k: manifest[k] for k in keys if k in manifest}
    out.update(weights_id=manifest["weights"], split_block=manifest["layers"]["split_block"])
    return out


def differences(spec: CacheSpec, recorded: dict) -> list[str]:
    """'<setting>: <recorded> -> <asked>' for each setting where `recorded` (a spec dict) differs."""
    asked, out = spec.to_dict(), []
    for name, value in recorded.items():
        if name not in asked or (name.startswith("mask_") and spec.split == "train"):
            continue
        if name == "encoder":
            out += [f"encoder {k}: {v!r} -> {asked[name].get(k)!r}" for k, v in value.items()
                    if asked[name].get(k) != v]
        elif name == "content" and asked[name] != value:
            out.append("the dataset's files (images or annotations added, removed or modified)")
        elif asked[name] != value:
            out.append(f"{_OPTION_NAMES.get(name, name)}: {value!r} -> {asked[name]!r}")
    return out


def check_existing(spec: CacheSpec, path: str | os.PathLike) -> None:
    """CacheError when `path` holds a finished cache, or an unfinished build, of another spec;
    the message names each setting that differs (cached value -> asked value)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        recorded, key, what = _recorded_spec(manifest), manifest["content_key"], "a cache"
    elif (path / BUILD_STATE).is_file():
        state = json.loads((path / BUILD_STATE).read_text())
        if not state.get("prepared") and not has_finished_shards(path):
            return              # a start that failed while preparing the folder: nothing to keep
        recorded, key, what = state.get("spec", {}), state.get("content_key"), "an unfinished build"
    else:
        return
    if key == spec.key():
        return
    diffs = differences(spec, recorded)
    why = (f"other settings ({'; '.join(diffs)})" if diffs else
           f"the same settings, but the dataset's files under {spec.root} changed since it was built "
           f"(or another spot-fast version built it)")
    raise CacheError(f"{path} holds {what} of {why}: delete it to rebuild, or pass another --out")


def has_finished_shards(path: Path) -> bool:
    """Whether an unfinished build at `path` has finished (marked) any shard: work worth keeping."""
    markers = path / SHARD_MARKERS
    return markers.is_dir() and any(markers.iterdir())
