"""Writing finished shards in the background: store files, fsync, checksums, then the shard's marker.

A marker (`.shards/shard-XXXXX.json`) is written only after the shard's files are on disk
(fsync'd), and holds their sha256, xxh3 and sizes, so a rerun can trust it or detect the damage.
"""
from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

from spot_fast.cache import wds_store, zarr_store
from spot_fast.cache.checks import fast_hash
from spot_fast.cache.layout import Shard
from spot_fast.cache.manifest import write_json_atomic
from spot_fast.encoders import file_sha256

FAIL_AFTER_ENV = "SPOT_FAST_CACHE_FAIL_AFTER"   # tests: die (os._exit) mid-way through shard N+1


def fsync_files(out: Path, files: list[str]) -> None:
    """Flush the files and the folders holding them (their renames) to the disk."""
    for path in [out / rel for rel in files] + sorted({(out / rel).parent for rel in files}):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_temporaries(out: Path) -> None:
    """Leftovers of a killed writer: our `*.tmp` files and zarr's `*.partial` chunk files."""
    for dirpath, _, files in os.walk(out):
        for name in files:
            if name.endswith((".tmp", ".partial")):
                os.unlink(os.path.join(dirpath, name))


class ShardWriter:
    """Writes finished shards (files, checksums, marker) in the background while encoding goes on."""

    def __init__(self, builder):
        self.b = builder
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.written = 0
        fail = os.environ.get(FAIL_AFTER_ENV)
        self.fail_after = int(fail) if fail else None
        if builder.spec.format == "zarr":
            self.store = zarr_store.ZarrStore(builder.out, builder.specs, mode="r+")
        self.thread = threading.Thread(target=self._loop, name="cache-writer", daemon=True)
        self.thread.start()

    def _on_file(self, rel: str) -> None:
        if self.fail_after is not None and self.written >= self.fail_after:
            os._exit(75)   # test hook: die like a SIGKILL, with this shard half-written

    def _write(self, shard: Shard) -> None:
        b = self.b
        if b.spec.format == "zarr":
            files = self.store.write(shard, on_file=self._on_file)
        else:
            files = wds_store.write_shard(b.out, shard, on_file=self._on_file)
        fsync_files(b.out, files)          # on disk before the marker says so (a machine crash loses nothing marked)
        marker = {"index": shard.index, "start": shard.start, "stop": shard.stop, "images": len(shard),
                  "files": {rel: file_sha256(b.out / rel) for rel in files},
                  "xxh3": {rel: fast_hash(b.out / rel) for rel in files},
                  "sizes": {rel: (b.out / rel).stat().st_size for rel in files},
                  "skipped": shard.skipped, "int_ids": shard.int_ids, "stats": shard.stats}
        write_json_atomic(b.marker(shard.index), marker)
        self.written += 1

    def _loop(self) -> None:
        while True:
            shard = self.queue.get()
            if shard is None:
                return
            if self.error is None:
                try:
                    self._write(shard)
                except BaseException as e:  # re-raised in the main thread by check()
                    self.error = e

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, shard: Shard) -> None:
        self.check()
        self.queue.put(shard)

    def finish(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.check()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
