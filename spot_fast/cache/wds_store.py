"""The WebDataset format: one plain tar per shard, one sample per stored image.

Sample `<row:09d>` holds `id.txt`, `features.npy` (V, N, D), optionally `split_tokens.npy`
(V, T, D), for 8-bit caches `features_scale.npy` (V, N, 1) and `split_tokens_scale.npy`, and for val `instance_mask.npy`, `class_mask.npy`, `ignore_mask.npy` (M, M) and
`jpg`. Tars are written and streamed with the webdataset library (`TarWriter`,
`tarfile_to_samples`), deterministically (fixed mtime/owner/mode) so that a rebuild is
byte-identical, to `shard-XXXXX.tar.tmp` and renamed once complete. Skipped images are absent.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from spot_fast.cache.layout import NUMERIC, Shard

ARRAY_FIELDS = NUMERIC


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.tar"


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def write_shard(path: Path, shard: Shard, on_file=None) -> list[str]:
    """Write `path/shard-XXXXX.tar` with webdataset's TarWriter (via .tmp + fsync + rename).

    Fixed mtime, owner and mode make a rebuild byte-identical. Returns its relative file name."""
    import webdataset as wds
    name = shard_name(shard.index)
    tmp = path / (name + ".tmp")
    with open(tmp, "wb") as f:
        with wds.TarWriter(f, user="", group="", mode=0o644, mtime=0, encoder=False) as tar:
            for i, row in enumerate(shard.rows):
                sample = {"__key__": f"{int(row):09d}", "id.txt": shard.image_ids[i].encode()}
                for field in ARRAY_FIELDS:
                    value = getattr(shard, field)
                    if value is not None:
                        sample[f"{field}.npy"] = _npy_bytes(value[i])
                if shard.jpeg is not None:
                    sample["jpg"] = shard.jpeg[i]
                tar.write(sample)
        f.flush()
        os.fsync(f.fileno())
    if on_file is not None:
        on_file(name + ".tmp")
    os.replace(tmp, path / name)
    return [name]


def decode_sample(files: dict[str, bytes]) -> dict:
    """{"id.txt": b"..", "features.npy": b"..", ...} -> {"image_id": str, "features": array, ...}."""
    out = {"image_id": files["id.txt"].decode()}
    for field in ARRAY_FIELDS:
        raw = files.get(f"{field}.npy")
        if raw is not None:
            out[field] = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
    if "jpg" in files:
        out["jpeg"] = bytes(files["jpg"])
    return out


def iter_tar(url: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(row, decoded sample) for each sample of one tar (a path or any URL webdataset opens)."""
    import webdataset as wds
    for raw in wds.DataPipeline(wds.SimpleShardList([str(url)]), wds.tarfile_to_samples()):
        yield int(raw["__key__"]), decode_sample({k: v for k, v in raw.items() if not k.startswith("__")})


def index_tar(path: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """{sample key: {extension: (byte offset of the member's data, size)}} of an uncompressed tar.

    Reads only the headers (the standard library's tarfile seeks over the data): the training
    reader memory-maps the tar and copies slabs straight out of the .npy members."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if member.isfile():
                key, _, ext = member.name.partition(".")
                out.setdefault(key, {})[ext] = (member.offset_data, member.size)
    return out


def stack_samples(index: int, start: int, stop: int, samples: list[tuple[int, dict]], specs: dict[str, dict]) -> Shard:
    """Decoded samples of one shard -> a Shard (row order as given); `specs`: the manifest's arrays."""
    rows = np.array([r for r, _ in samples], dtype=np.int64)
    arrays = {}
    for field in ARRAY_FIELDS:
        if field in specs:
            spec = specs[field]
            arrays[field] = np.stack([s[field] for _, s in samples]) if samples else \
                np.zeros((0, *spec["shape"][1:]), spec["dtype"])
    jpeg = [s["jpeg"] for _, s in samples] if "jpeg" in specs else None
    return Shard(index, start, stop, rows, [s["image_id"] for _, s in samples], jpeg=jpeg, **arrays)


def read_shard(path: Path, index: int, start: int, stop: int, specs: dict[str, dict]) -> Shard:
    return stack_samples(index, start, stop, list(iter_tar(path / shard_name(index))), specs)
