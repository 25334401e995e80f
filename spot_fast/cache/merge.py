"""The last step of a build: the manifest, merged from the shard markers every rank wrote.

The manifest records what the cache holds and how to check it (manifest.py), the stored format
(`quantization` for 8-bit caches) and what storing cost in accuracy (`stored_error`: the
stored tokens against the encoder's output, and stage-2 tail consistency; encode.py).
"""
from __future__ import annotations

import json
import shutil

from spot_fast import __version__
from spot_fast.cache.codec import merge_stats
from spot_fast.cache.manifest import (BUILD_STATE, SCHEMA_VERSION, SHARD_MARKERS, TAIL_FILE, CacheError,
                                      write_manifest)
from spot_fast.cache.paths import encoder_description
from spot_fast.cache.ranks import ERRORS
from spot_fast.encoders import file_sha256

QUANTIZATION = {d: {"format": "e4m3" if d == "fp8" else "int8", "granularity": "per token row",
                    "scale": "float32, max|row| / format max (fp8 448, int8 127)",
                    "final_tokens": "with --split-block: the frozen tail applied to the stored split tokens"}
                for d in ("fp8", "int8")}
STORED_NOTE = {"bf16": " (bfloat16 bits)", "fp8": " (float8_e4m3fn bits) + float32 scale per token",
               "int8": " + float32 scale per token"}


def rounded(stats: dict) -> dict:
    """Error stats to 6 significant digits: the last bits of a float sum may differ between thread
    counts, and a resumed build must stay byte-identical."""
    return {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in stats.items()}


def merge(b) -> dict:
    """Rank 0, after all ranks are done: the manifest of build `b` (a build._Builder) from its shard markers."""
    shards, skipped, int_ids, stats = [], [], True, []
    for k in range(len(b.bounds)):
        if not b.marker(k).is_file():
            raise CacheError(f"shard {k} of {b.out} was not built (a build process failed?): "
                             f"rerun the same command to finish it")
        m = json.loads(b.marker(k).read_text())
        shards.append({key: m[key] for key in ("index", "start", "stop", "images", "files", "xxh3")})
        skipped += m["skipped"]
        stats.append(m.get("stats", {}))
        int_ids &= m["int_ids"] or m["images"] == 0
    meta = ["zarr.json"] + [f"{n}/zarr.json" for n in b.specs] if b.spec.format == "zarr" else []
    if b.spec.split_block is not None:
        meta.append(TAIL_FILE)
    spec, cfg = b.spec, b.spec.encoder
    stored = sum(s["images"] for s in shards)
    manifest = {
        "schema_version": SCHEMA_VERSION, "complete": True, "spot_fast_version": __version__,
        "content_key": b.key, "dataset": spec.dataset, "root": spec.root, "split": spec.split,
        "source_options": spec.source_options, "content": spec.content, "format": spec.format,
        "encoder": encoder_description(cfg), "weights": spec.weights_id, "random_init": spec.random_init,
        "image_size": cfg.image_size, "patch_size": cfg.spec.patch_size,
        "grid": [cfg.grid_size, cfg.grid_size], "num_patches": cfg.num_patches, "feature_dim": cfg.feature_dim,
        "num_prefix_tokens": b.encoder.num_prefix_tokens,
        "views": b.views, "views_spec": b.source.views_spec(),
        "layers": {"final": f"output of block {cfg.spec.depth - 1}, no final norm, CLS/registers dropped",
                   "split_block": spec.split_block,
                   "split_tokens": None if spec.split_block is None else
                   f"input of block {spec.split_block}, CLS/registers kept"},
        "dtype": spec.dtype, "autocast": spec.autocast,
        "quantization": QUANTIZATION.get(spec.dtype),
        "stored_error": {layer: rounded(merge_stats([st[layer] for st in stats if layer in st]))
                         for layer in dict.fromkeys(layer for st in stats for layer in st)},
        "stored_dtype": b.specs["features"]["dtype"] + STORED_NOTE.get(spec.dtype, ""),
        "mask_size": spec.mask_size if spec.split == "val" else None,
        "mask_dtype": spec.mask_dtype if spec.split == "val" else None,
        "chunk_images": spec.chunk_images, "compression": spec.compression,
        "image_id_type": "int" if int_ids else "str",
        "counts": {"source_images": b.num_rows, "images": stored, "skipped": len(skipped),
                   "shards": len(shards)},
        "skipped": sorted(skipped, key=lambda s: s["index"]),
        "arrays": b.specs,
        "files": {rel: file_sha256(b.out / rel) for rel in meta},
        "shards": shards,
    }
    write_manifest(b.out, manifest)
    shutil.rmtree(b.out / SHARD_MARKERS, ignore_errors=True)
    shutil.rmtree(b.out / ERRORS, ignore_errors=True)
    (b.out / BUILD_STATE).unlink(missing_ok=True)
    return manifest
