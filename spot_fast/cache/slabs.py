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

import ctypes
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
        self.resident = Residency(maps)
        self._items: dict[tuple[int, int], np.ndarray] = {}     # (file, itemsize) -> the map as items

    def start(self, s: int, v: int) -> int:
        """Byte offset of sample s, view v in its file (views of a sample are consecutive)."""
        return int(self.starts(np.asarray(s), np.asarray(v)))

    def starts(self, samples: np.ndarray, views: np.ndarray) -> np.ndarray:
        """Byte offsets of slabs (samples[i], views[i]) in their files."""
        return self.offset[samples] + views * self.nbytes

    def slab(self, s: int, v: int) -> np.ndarray:
        """Sample s, view v: a stored-dtype view into the map (no copy)."""
        start = self.start(s, v)
        return self.maps[self.file[s]][start:start + self.nbytes].view(self.dtype).reshape(self.shape)  # (L, D)

    def advise(self, samples: np.ndarray, views: np.ndarray) -> None:
        """Ask the kernel to start reading these slabs (MADV_WILLNEED), all at once, so cold reads
        overlap. A slab already read is skipped (the advice walks every page): one whose own page,
        `owned_page`, is in the page cache. Not its first page: slabs are not page-aligned, so that
        page is shared with the slab before it, and once that neighbour was read a cold slab would
        look warm, go unadvised and be read by page faults, one read-around at a time (cold int8
        reads ran at half their speed that way)."""
        if self.nbytes < SMALL_SLAB:
            return
        n = self.nbytes
        for f, start in zip(self.file[samples].tolist(), self.starts(samples, views).tolist()):
            probe = owned_page(start, n)
            if probe is None or not self.resident(f, probe):
                page = start - start % mmap.PAGESIZE
                self.mmaps[f].madvise(mmap.MADV_WILLNEED, page, start + n - page)

    def fill(self, out: torch.Tensor, samples: np.ndarray, views: np.ndarray, advise: bool = True) -> None:
        """out[i] = slab(samples[i], views[i]) for i < len(samples): one copy per slab, in `out`'s dtype.

        Same dtype: a numpy byte copy (releases the GIL, so worker threads copy in parallel);
        otherwise torch's converting copy, still one pass. Small slabs (8-bit caches' per-token
        scales, under a page each) are gathered by one numpy index per file instead. `advise`:
        advise the slabs first (False: the caller advised them earlier, see TrainReader)."""
        raw = _raw_numpy(out, self.stored)
        if raw is not None and self.nbytes < SMALL_SLAB:
            return self._gather(raw, samples, views)
        if advise:
            self.advise(samples, views)
        n, files = self.nbytes, self.file[samples].tolist()
        starts = self.starts(samples, views).tolist()
        if raw is not None:
            flat = raw[:len(starts)].reshape(len(starts), -1).view(np.uint8)        # (b, nbytes)
            for i, (f, start) in enumerate(zip(files, starts)):
                np.copyto(flat[i], self.maps[f][start:start + n])
            return
        for i, (s, v) in enumerate(zip(samples.tolist(), views.tolist())):
            out[i].copy_(stored_tensor(self.slab(s, v), self.stored))

    def _gather(self, raw: np.ndarray, samples: np.ndarray, views: np.ndarray) -> None:
        """raw[i] = the bytes of slab (samples[i], views[i]), by fancy indexing (one op per file).

        Slabs whose offsets are multiples of the item size are gathered as rows of items (4x fewer
        indices for float32 scales than bytes)."""
        starts = self.starts(samples, views)                                        # (b,)
        files = self.file[samples]
        item = self.dtype.itemsize if not (starts % self.dtype.itemsize).any() else 1
        flat = raw[:len(samples)].reshape(len(samples), -1).view(np.dtype(f"V{item}"))   # (b, nbytes / item)
        index = starts[:, None] // item + np.arange(self.nbytes // item)           # (b, items per slab)
        order = np.argsort(files, kind="stable")
        cuts = np.flatnonzero(np.diff(files[order])) + 1
        for rows in np.split(order, cuts):
            flat[rows] = self._as_items(int(files[rows[0]]), item)[index[rows]]

    def _as_items(self, f: int, item: int) -> np.ndarray:
        """Map f viewed as items of `item` bytes (trailing bytes left out)."""
        key = (f, item)
        if key not in self._items:
            m = self.maps[f]
            self._items[key] = m[: len(m) // item * item].view(np.dtype(f"V{item}"))
        return self._items[key]


def owned_page(start: int, nbytes: int) -> int | None:
    """The first page that lies wholly inside the slab [start, start + nbytes): no other slab's
    read brings it into the page cache. None when the slab holds no whole page."""
    page = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    return page if page + mmap.PAGESIZE <= start + nbytes else None


class Residency:
    """Is a page of a memory map in the page cache? One `mincore` of one page (Linux, through libc),
    far cheaper than advising a warm slab's every page. Where mincore cannot be called, every
    page counts as absent (the slab is advised, as before)."""

    def __init__(self, maps: list[mmap.mmap]):
        self.bases = None
        if _LIBC is not None:
            try:
                self.bases = [ctypes.addressof(ctypes.c_char.from_buffer(m)) for m in maps]
            except (TypeError, ValueError, BufferError):      # a read-only or empty map: no address
                self.bases = None

    def __call__(self, f: int, page: int) -> bool:
        if self.bases is None:
            return False
        vec = ctypes.c_ubyte()                  # one per call: reader threads ask at the same time
        if _LIBC.mincore(self.bases[f] + page, 1, ctypes.byref(vec)) != 0:
            return False
        return bool(vec.value & 1)


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.mincore.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()
SMALL_SLAB = 4096       # bytes: slabs below this are gathered (per-slab calls would cost more than the bytes)


class ZarrSlabs:
    """Slabs of a compressed zarr array, read through the zarr API: each needed chunk decoded once per batch."""

    def __init__(self, array, rows: np.ndarray, chunk: int, shape: tuple[int, int], stored: str):
        self.array, self.rows, self.chunk, self.shape, self.stored = array, rows, chunk, shape, stored

    def slab(self, s: int, v: int) -> np.ndarray:
        return np.asarray(self.array[int(self.rows[s]), v])

    def advise(self, samples: np.ndarray, views: np.ndarray) -> None:
        """Nothing to advise: compressed chunks are read whole, when a batch needs them."""

    def fill(self, out: torch.Tensor, samples: np.ndarray, views: np.ndarray, advise: bool = True) -> None:
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


class TableSlabs:
    """Small slabs (8-bit caches' per-token scales: L float32 per slab, 1/192 of the int8 token
    bytes) held in memory as one (S, V, L, D) table, so a batch is one fancy index instead of a
    gather per shard file. Built once per cache and process from the mapped slabs."""

    def __init__(self, mapped: MappedSlabs, views: int):
        self.shape, self.stored = mapped.shape, mapped.stored
        S = len(mapped.file)
        self.table = np.empty((S, views, *mapped.shape), mapped.dtype)
        flat = self.table.reshape(S * views, *mapped.shape)
        samples, v = np.repeat(np.arange(S), views), np.tile(np.arange(views), S)
        for lo in range(0, S * views, 4096):                    # bounded index arrays
            mapped._gather(flat[lo:lo + 4096], samples[lo:lo + 4096], v[lo:lo + 4096])

    def advise(self, samples: np.ndarray, views: np.ndarray) -> None:
        """Nothing to advise: the table is in memory."""

    def fill(self, out: torch.Tensor, samples: np.ndarray, views: np.ndarray, advise: bool = True) -> None:
        raw = _raw_numpy(out, self.stored)
        if raw is None:
            out[:len(samples)].copy_(stored_tensor(self.table[samples, views], self.stored))
        else:
            np.take(self.table.reshape(-1, *self.shape), samples * self.table.shape[1] + views, axis=0,
                    out=raw[:len(samples)])


def _raw_numpy(out: torch.Tensor, stored: str) -> np.ndarray | None:
    """A numpy view of `out` when it holds the stored dtype, else None (convert)."""
    return raw_numpy(out) if out.dtype == STORED_TORCH[stored] else None


def array_codec(cache, name: str) -> str:
    """The codec name of array `name`: the cache's dtype, or fp32 for the 8-bit scales."""
    return "fp32" if name.endswith(SCALE_SUFFIX) else cache.dtype


def zarr_slabs(cache, name: str, check: bool = True) -> MappedSlabs | ZarrSlabs | TableSlabs:
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
    mapped = MappedSlabs(maps, where, smp.pos * views * slab, (L, D), array_codec(cache, name))
    return _small_in_memory(cache, name, mapped, views, check)


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


def _small_in_memory(cache, name: str, mapped: MappedSlabs, views: int, check: bool) -> MappedSlabs | TableSlabs:
    """8-bit scales as a table in memory (kept by the cache: built once per process), else the maps.
    zarr only: its scales lie in files of their own, each checked (`check`) before the table reads
    it; a WebDataset cache's lie inside the tars, which are checked one by one as batches reach them."""
    if not name.endswith(SCALE_SUFFIX) or mapped.nbytes >= SMALL_SLAB:
        return mapped
    if name not in cache.tables:
        if check:
            for k in np.unique(cache.samples.shard).tolist():
                cache.check_shard(k, (name,))
        cache.tables[name] = TableSlabs(mapped, views)
    return cache.tables[name]


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
