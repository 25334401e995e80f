"""Cheap integrity checks: a fast file hash, and each shard file checked the first time a process reads it.

The manifest holds two hashes per file: sha256 (`spot-fast cache verify`, the slow thorough
check) and xxh3-64 (`fast_hash`, ~10+ GB/s: it runs before a reader first touches a file, so
a corrupted or truncated shard is refused instead of read). `xxhash` is a dependency for this
alone: zlib.crc32 runs at ~1 GB/s here, xxh3 at ~10 GB/s, and hashlib has nothing of that class.
"""
from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path

import xxhash

from spot_fast.cache.manifest import CacheError
from spot_fast.encoders import file_sha256

def fast_hash(path: str | os.PathLike) -> str:
    """xxh3-64 of a file's bytes, as 16 hex digits. Hashed straight from a memory map: reading into
    a buffer first is ~5x slower than the hash itself."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_64(b"").hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return xxhash.xxh3_64(m).hexdigest()


def signature(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """(size, mtime_ns, inode) of a file, or None when it is missing: a rewrite changes one of them."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


class FirstReadCheck:
    """Hash each file once per process before it is read; thread-safe, each file hashed by one thread.

    A file already checked is stat'ed on every later `ensure` (a reader calls it when it opens, so
    every epoch): when its size, mtime or inode changed -- a shard rewritten under a running job --
    it is refused, since the bytes this process maps may no longer be the checked ones."""

    def __init__(self):
        self._lock = threading.Lock()
        self._done: dict[tuple[str, str], threading.Event] = {}
        self._bad: dict[tuple[str, str], str] = {}
        self._stat: dict[tuple[str, str], tuple | None] = {}

    def ensure(self, cache: Path, files: list[tuple[str, str, str]]) -> None:
        """files: (relative path, expected hash, owner such as "shard 3 (images 12..15)"). The hash is
        xxh3 (16 hex digits), or sha256 (64) for caches built before xxh3 was recorded."""
        for rel, expected, owner in files:
            key = (str((cache / rel).resolve()), expected)
            with self._lock:
                event = self._done.get(key)
                mine = event is None
                if mine:
                    event = self._done[key] = threading.Event()
            if mine:
                try:
                    self._check(cache, rel, expected, owner, key)
                finally:
                    event.set()
            else:
                event.wait()
            if key in self._bad:
                raise CacheError(self._bad[key])
            if not mine and signature(cache / rel) != self._stat.get(key):
                raise CacheError(f"cache {cache}: {owner}: {rel} changed on disk while this process was reading "
                                 f"the cache (rewritten or deleted by another process?); run `spot-fast cache "
                                 f"verify {cache}`, and rebuild the cache if it reports damage (delete it and "
                                 f"rerun its build command), then restart the job")

    def _check(self, cache: Path, rel: str, expected: str, owner: str, key) -> None:
        file = cache / rel
        self._stat[key] = signature(file)       # before hashing: a rewrite during the hash shows later
        if not file.is_file():
            problem = "is missing"
        elif (fast_hash(file) if len(expected) == 16 else file_sha256(file)) != expected:
            problem = "is corrupt (its checksum differs from the manifest's)"
        else:
            return
        self._bad[key] = (f"cache {cache}: {owner}: {rel} {problem}; run `spot-fast cache verify {cache}` "
                          f"to list every damaged file, then rebuild the cache (delete it and rerun its "
                          f"build command)")


FIRST_READ = FirstReadCheck()      # one per process: a file checked once is not hashed again
