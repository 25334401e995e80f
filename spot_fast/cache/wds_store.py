"""The WebDataset format: one plain tar per shard, one sample per stored image.

Sample `<row:09d>` holds `id.txt`, `features.npy` (V, N, D), optionally `split_tokens.npy`
(V, T, D), and for val `instance_mask.npy`, `class_mask.npy`, `ignore_mask.npy` (M, M) and
`jpg`. Tars are written deterministically (fixed mtime/owner/mode, USTAR) so that a rebuild is
byte-identical, to `shard-XXXXX.tar.tmp` and renamed once complete. Skipped images are absent.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from spot_fast.cache.layout import MASK_NAMES, Shard

ARRAY_FIELDS = ("features", "split_tokens", *MASK_NAMES)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.tar"


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, shard: Shard, on_file=None) -> list[str]:
    """Write `path/shard-XXXXX.tar` (via .tmp + rename); returns its relative file name."""
    name = shard_name(shard.index)
    tmp = path / (name + ".tmp")
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, row in enumerate(shard.rows):
                key = f"{int(row):09d}"
                _add(tar, f"{key}.id.txt", shard.image_ids[i].encode())
                for field in ARRAY_FIELDS:
                    value = getattr(shard, field)
                    if value is not None:
                        _add(tar, f"{key}.{field}.npy", _npy_bytes(value[i]))
                if shard.jpeg is not None:
                    _add(tar, f"{key}.jpg", shard.jpeg[i])
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


def iter_tar(source) -> Iterator[tuple[int, dict]]:
    """(row, decoded sample) for each sample of a tar (a path or a readable binary file)."""
    if isinstance(source, (str, os.PathLike)):
        tar = tarfile.open(source, mode="r|")
    else:
        tar = tarfile.open(fileobj=source, mode="r|")
    with tar:
        key, files = None, {}
        for member in tar:
            if not member.isfile():
                continue
            k, _, ext = member.name.partition(".")
            if k != key and key is not None:
                yield int(key), decode_sample(files)
                files = {}
            key = k
            files[ext] = tar.extractfile(member).read()
        if key is not None:
            yield int(key), decode_sample(files)


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
