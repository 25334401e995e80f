"""The zarr v3 format: one group, one array per layout entry, chunked along images.

Shard k is chunk k of every array. zarr's LocalStore writes each chunk file to a `.partial`
tmp name and renames it, so a file is complete or absent; a shard counts as done only once the
builder has recorded its checksums (see build.py). Uncompressed by default (reads are memcpy),
optionally zstd. `jpeg` is zarr-python's variable-length bytes type.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zarr

from spot_fast.cache.layout import NUMERIC, Shard


def _zarr_dtype(name: str):
    if name == "bytes":
        return zarr.core.dtype.VariableLengthBytes()
    return name


@contextmanager
def _quiet():
    """zarr warns that variable-length bytes have no v3 spec yet; we accept that (documented above)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")
        yield


def create(path: Path, specs: dict[str, dict], chunk_images: int, zstd_level: int | None,
           attrs: dict) -> list[str]:
    """Create the group and its empty arrays; returns the metadata files (relative paths)."""
    with _quiet():
        group = zarr.open_group(str(path), mode="a", zarr_format=3, attributes=attrs)  # "w" would delete .build.json
        for name, spec in specs.items():
            compressors = None
            if zstd_level is not None and spec["dtype"] not in ("bytes", "str"):
                compressors = zarr.codecs.ZstdCodec(level=zstd_level)
            group.create_array(name, shape=tuple(spec["shape"]), dtype=_zarr_dtype(spec["dtype"]),
                               chunks=(chunk_images, *spec["shape"][1:]), compressors=compressors,
                               fill_value=b"" if spec["dtype"] == "bytes" else ("" if spec["dtype"] == "str" else 0))
    return ["zarr.json"] + [f"{name}/zarr.json" for name in specs]


def chunk_file(name: str, ndim: int, index: int) -> str:
    """Relative path of chunk `index` of array `name` (default v3 chunk keys, '/' separator)."""
    return "/".join([name, "c", str(index)] + ["0"] * (ndim - 1))


class ZarrStore:
    """Read/write shards of the zarr cache at `path`.

    Reading has a fast path for uncompressed caches (`raw=True`): an uncompressed v3 chunk of a
    numeric array is exactly its C-order little-endian bytes (edge chunks padded to full size), so
    it is read with one `np.fromfile`, ~3x faster than going through zarr's codec pipeline. The
    zarr-API path (`raw=False`) is the reference; tests hold the two equal.
    """

    def __init__(self, path: Path, specs: dict[str, dict], mode: str = "r", chunk_images: int | None = None,
                 raw: bool = False):
        self.path = Path(path)
        self.specs = specs
        self.chunk_images, self.raw = chunk_images, raw and chunk_images is not None
        with _quiet():
            self.group = zarr.open_group(str(path), mode=mode, zarr_format=3)
            # write_empty_chunks is a runtime setting, not stored: without it an all-zero chunk
            # (a shard of skipped images) would not be written and its checksum could not exist.
            self.arrays = {name: self.group[name].with_config({"write_empty_chunks": True}) for name in specs}

    def _block(self, name: str, index: int, start: int, stop: int) -> np.ndarray:
        """Rows start..stop of array `name` (all of chunk `index`)."""
        spec = self.specs[name]
        if not self.raw or spec["dtype"] in ("str", "bytes"):
            return self.arrays[name][start:stop]
        chunk = (self.chunk_images, *spec["shape"][1:])
        a = np.fromfile(self.path / chunk_file(name, len(chunk), index), dtype=np.dtype(spec["dtype"]).newbyteorder("<"))
        return a.reshape(chunk)[: stop - start]

    def write(self, shard: Shard, on_file=None) -> list[str]:
        """Write shard `shard.index` (rows start..stop); skipped rows become zeros. Returns its files."""
        n = shard.stop - shard.start
        pos = shard.rows - shard.start                     # positions of the valid rows in the chunk
        valid = np.zeros(n, np.uint8)
        valid[pos] = 1
        ids = np.full(n, "", dtype=object)
        ids[pos] = shard.image_ids
        full = {"valid": valid, "image_id": ids}
        for name in NUMERIC:
            if name in self.specs:
                part = getattr(shard, name)
                block = np.zeros((n, *part.shape[1:]), part.dtype)
                block[pos] = part
                full[name] = block
        if "jpeg" in self.specs:
            jpegs = np.full(n, b"", dtype=object)
            for p, data in zip(pos, shard.jpeg):
                jpegs[p] = data
            full["jpeg"] = jpegs
        files = []
        with _quiet():
            for name in self.specs:
                self.arrays[name][shard.start:shard.stop] = full[name]
                files.append(chunk_file(name, len(self.specs[name]["shape"]), shard.index))
                if on_file is not None:
                    on_file(files[-1])
        return files

    def read(self, index: int, start: int, stop: int, names: tuple[str, ...] | None = None) -> Shard:
        """The valid rows of shard `index`; `names` limits which token/mask arrays are read."""
        with _quiet():
            return self._read(index, start, stop, tuple(self.specs) if names is None else names)

    def _read(self, index: int, start: int, stop: int, names: tuple[str, ...]) -> Shard:
        valid = self._block("valid", index, start, stop).astype(bool)
        keep = np.flatnonzero(valid)
        ids = self.arrays["image_id"][start:stop]
        out = {}
        for name in NUMERIC:
            if name in names and name in self.specs:
                block = self._block(name, index, start, stop)
                out[name] = block if len(keep) == len(valid) else block[keep]
        jpeg = None
        if "jpeg" in names and "jpeg" in self.specs:
            raw = self.arrays["jpeg"][start:stop]
            jpeg = [bytes(raw[i]) for i in keep]
        return Shard(index, start, stop, keep + start, [str(ids[i]) for i in keep], jpeg=jpeg, **out)
