"""Where each (image, view) token slab of a cache lies on disk, and copying selected slabs into a buffer.

In both formats one view of one image is a contiguous run of bytes in the stored dtype:
- zarr, uncompressed: chunk file k of `features` is the (C, V, N, D) block of shard k in C order
  (edge chunks padded), so sample s, view v starts at ((row - start) * V + v) * N * D * itemsize;
- WebDataset: the `features.npy` member of a sample is a (V, N, D) .npy file inside the tar: its
  data starts after the member header and the .npy header.
Files are memory-mapped (copy-on-write maps: nothing is ever written back) and a batch is one
copy of exactly the selected slabs. Compressed zarr caches have no such slabs: `ZarrSlabs`
reads them through the zarr API (the reference the fast path is tested against).
"""
from __future__ import annotations

import io
import mmap

import numpy as np
import torch

from spot_fast.cache.codec import STORED_NUMPY, STORED_TORCH, SCALE_SUFFIX, raw_numpy, stored_tensor
from spot_fast.cache.manifest import CacheError


class MappedSlabs:
    """Slabs of one token array as (memory map, byte offset of view 0) per sample."""

    def __init__(self, maps: list[mmap.mmap], file: np.ndarray, offset: np.ndarray,
                 shape: tuple[int, int], stored: str):
        self.mmaps = maps                        # memory maps, one per file (for madvise)
        self.maps = [np.frombuffer(m, np.uint8) for m in maps]   # the same bytes as uint8 arrays
        self.file = file                         # (S,) which map holds sample s
        self.offset = offset                     # (S,) byte offset of sample s, view 0
        self.shape = shape                       # (L, D) of one slab
        self.stored = stored                     # codec name: "fp16" | "bf16" | "fp32" | "fp8" | "int8"
        self.dtype = np.dtype(STORED_NUMPY[stored])
        self.nbytes = shape[0] * shape[1] * self.dtype.itemsize

    def start(self, s: int, v: int) -> int:
        """Byte offset of sample s, view v in its file (views of a sample are consecutive)."""
        return int(self.offset[s]) + v * self.nbytes

    def slab(self, s: int, v: int) -> np.ndarray:
        """Sample s, view v: a stored-dtype view into the map (no copy)."""
        start = self.start(s, v)
        return self.maps[self.file[s]][start:start + self.nbytes].view(self.dtype).reshape(self.shape)  # (L, D)

    def fill(self, out: torch.Tensor, samples: np.ndarray, views: np.ndarray) -> None:
        """out[i] = slab(samples[i], views[i]) for i < len(samples): one copy per slab, in `out`'s dtype.

        Same dtype: a numpy byte copy (releases the GIL, so worker threads copy in parallel);
        otherwise torch's converting copy, still one pass. Small slabs (8-bit caches' per-token
        scales, under a page each) are gathered by one numpy index per file instead."""
        raw = _raw_numpy(out, self.stored)
        if raw is not None and self.nbytes < SMALL_SLAB:
            return self._gather(raw, samples, views)
        pairs = list(zip(samples.tolist(), views.tolist()))
        for s, v in pairs:           # ask the kernel for every slab at once: cold reads then overlap
            start = self.start(s, v)
            page = start - start % mmap.PAGESIZE
            self.mmaps[self.file[s]].madvise(mmap.MADV_WILLNEED, page, start + self.nbytes - page)
        for i, (s, v) in enumerate(pairs):
            src = self.slab(s, v)
            if raw is not None:
                np.copyto(raw[i], src.view(raw.dtype))
            else:
                out[i].copy_(stored_tensor(src, self.stored))


    def _gather(self, raw: np.ndarray, samples: np.ndarray, views: np.ndarray) -> None:
        """raw[i] = the bytes of slab (samples[i], views[i]), by fancy indexing (one op per file)."""
        starts = self.offset[samples] + views * self.nbytes                         # (b,)
        files = self.file[samples]
        flat = raw[:len(samples)].reshape(len(samples), -1).view(np.uint8)         # (b, nbytes)
        span = np.arange(self.nbytes)
        for f in np.unique(files).tolist():
            rows = np.flatnonzero(files == f)
            flat[rows] = self.maps[f][starts[rows, None] + span]


SMALL_SLAB = 4096       # bytes: slabs below this are gathered (per-slab calls would cost more than the bytes)


class ZarrSlabs:
    """Slabs of a compressed zarr array, read through the zarr API: each needed chunk decoded once per batch."""

    def __init__(self, array, rows: np.ndarray, chunk: int, shape: tuple[int, int], stored: str):
        self.array, self.rows, self.chunk, self.shape, self.stored = array, rows, chunk, shape, stored

    def slab(self, s: int, v: int) -> np.ndarray:
        return np.asarray(self.array[int(self.rows[s]), v])

    def fill(self, out: torch.Tensor, samples: np.ndarray, views: np.ndarray) -> None:
        rows, C = self.rows[samples], self.chunk
        block = np.empty((len(samples), *self.shape), STORED_NUMPY[self.stored])      # (b, L, D)
        for c in np.unique(rows // C).tolist():
            m = rows // C == c
            block[m] = np.asarray(self.array[c * C:(c + 1) * C])[rows[m] - c * C, views[m]]
        raw = _raw_numpy(out, self.stored)
        if raw is not None:
            np.copyto(raw[:len(samples)], block.view(raw.dtype))
        else:
            out[:len(samples)].copy_(stored_tensor(block, self.stored))


def _raw_numpy(out: torch.Tensor, stored: str) -> np.ndarray | None:
    """A numpy view of `out` when it holds the stored dtype, else None (convert)."""
    return raw_numpy(out) if out.dtype == STORED_TORCH[stored] else None


def array_codec(cache, name: str) -> str:
    """The codec name of array `name`: the cache's dtype, or fp32 for the 8-bit scales."""
    return "fp32" if name.endswith(SCALE_SUFFIX) else cache.dtype


def zarr_slabs(cache, name: str) -> MappedSlabs | ZarrSlabs:
    """The slabs of array `name` of a zarr cache (memory-mapped chunk files when uncompressed)."""
    spec = cache.manifest["arrays"][name]
    views, L, D = spec["shape"][1:]
    smp = cache.samples
    if cache.manifest["compression"] is not None:
        return ZarrSlabs(cache.zarr.arrays[name], smp.rows, cache.manifest["chunk_images"], (L, D),
                         array_codec(cache, name))
    shards = [s["index"] for s in cache.shards if s["images"] > 0]
    maps = [cache.file_map(cache.shard_file(k, name)) for k in shards]
    where = np.searchsorted(np.array(shards), smp.shard)
    slab = L * D * np.dtype(STORED_NUMPY[array_codec(cache, name)]).itemsize
    chunk = cache.manifest["chunk_images"] * views * slab
    for k, m in zip(shards, maps):
        if len(m) != chunk:
            raise CacheError(f"cache {cache.path}: {cache.shard_file(k, name)} holds {len(m)} bytes, an "
                             f"uncompressed chunk holds {chunk}: run `spot-fast cache verify {cache.path}` "
                             f"and rebuild the cache")
    return MappedSlabs(maps, where, smp.pos * views * slab, (L, D), array_codec(cache, name))


def wds_slabs(cache, name: str) -> MappedSlabs:
    """The slabs of array `name` of a WebDataset cache: .npy members inside memory-mapped tars."""
    spec = cache.manifest["arrays"][name]
    smp = cache.samples
    shards = [s["index"] for s in cache.shards if s["images"] > 0]
    maps = [cache.tar_map(k) for k in shards]
    where = np.searchsorted(np.array(shards), smp.shard)
    offset = np.zeros(len(smp), np.int64)
    for s, (row, k) in enumerate(zip(smp.rows.tolist(), smp.shard.tolist())):
        start, size = cache.tar_index(k)[f"{row:09d}"][f"{name}.npy"]
        offset[s] = start + _npy_data_offset(cache.tar_map(k)[start:start + min(size, 4096)],
                                             tuple(spec["shape"][1:]), array_codec(cache, name),
                                             f"shard {k}, row {row}")
    return MappedSlabs(maps, where, offset, tuple(spec["shape"][2:]), array_codec(cache, name))


def _npy_data_offset(head: np.ndarray, shape: tuple[int, ...], stored: str, where: str) -> int:
    """Bytes from the start of a .npy file to its data; CacheError unless it holds `shape` in `stored`."""
    f = io.BytesIO(bytes(head))
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    got_shape, fortran, dtype = read(f)
    if tuple(got_shape) != shape or fortran or dtype != np.dtype(STORED_NUMPY[stored]).newbyteorder("<"):
        raise CacheError(f"{where}: .npy holds {got_shape} {dtype}, the manifest says {shape} {stored}: "
                         f"the cache is damaged, rebuild it")
    return f.tell()
