"""Integrity of a cache while jobs use it, and refusals before anything is written: a shard
rewritten between epochs, damaged zarr metadata, a zstd level zstd lacks, a failed start's folder,
a shard deleted during a build."""
from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from cache_fakes import FakeSource, build_tiny, tiny_encoder, tiny_spec  # noqa: E402
from test_cache_process import assert_same_tree  # noqa: E402

from spot_fast.cache import CacheError, open_cache  # noqa: E402
from spot_fast.cache.manifest import BUILD_STATE  # noqa: E402
from spot_fast.cache.splits import write_failure  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(*args):
    from spot_fast.cli.app import app
    return CliRunner().invoke(app, ["cache", *map(str, args)])


@pytest.mark.parametrize("how", ["in place", "renamed over"])
@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_shard_rewritten_between_epochs_stops_the_reader(tmp_path, fmt, how):
    path = build_tiny(tmp_path / "c", n=8, format=fmt, chunk_images=4).path
    cache = open_cache(path, allow_random_init=True)
    assert sum(len(b["index"]) for b in cache.train_reader(4, epoch=0)) == 8        # epoch 0 reads both shards
    rel = "features/c/1/0/0/0" if fmt == "zarr" else "shard-00001.tar"
    data = bytearray((path / rel).read_bytes())
    data[-100] ^= 0x01
    if how == "in place":
        with open(path / rel, "r+b") as f:
            f.write(bytes(data))
    else:
        (path / (rel + ".new")).write_bytes(bytes(data))
        os.replace(path / (rel + ".new"), path / rel)
    with pytest.raises(CacheError, match=r"shard 1 .*changed on disk.*spot-fast cache verify"):
        for _ in cache.train_reader(4, epoch=1):
            pass


def test_unchanged_cache_reads_every_epoch(tmp_path):
    """The watch does not fire on a cache nobody touches (a watch that always fires passes the test above)."""
    cache = open_cache(build_tiny(tmp_path / "c", n=8, chunk_images=4).path, allow_random_init=True)
    for epoch in range(3):
        assert sum(len(b["index"]) for b in cache.train_reader(4, epoch=epoch)) == 8


def test_damaged_zarr_metadata_is_one_line(tmp_path):
    path = build_tiny(tmp_path / "c", n=4, chunk_images=4).path
    (path / "features" / "zarr.json").write_text('{"zarr_format": 3, "shape": [')
    with pytest.raises(CacheError, match=r"cache metadata: features/zarr.json is corrupt.*verify") as e:
        next(iter(open_cache(path, allow_random_init=True).train_reader(2)))
    assert "\n" not in str(e.value)


def test_zstd_level_beyond_zstd_is_refused_before_any_folder(tmp_path):
    out = tmp_path / "c"
    res = _cli("synthetic", "--root", tmp_path, "--random-init", "--preset", "tiny", "--compress", "zstd:99",
               "--out", out)
    assert res.exit_code == 2 and "zstd levels run from -7" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and not out.exists()
    with pytest.raises(CacheError, match="zstd levels"):
        tiny_spec("/fake", compression="zstd:23")


def test_failed_start_does_not_block_the_corrected_command(tmp_path):
    """A folder left by a start of other settings that failed while preparing the folder (e.g. a
    compression zarr could not set up) is taken over; a prepared build of other settings is still
    refused, naming what differs (it may be a build someone means to resume)."""
    out = tmp_path / "c"
    other = tiny_spec("/fake/data", compression="zstd:5")
    out.mkdir()
    (out / BUILD_STATE).write_text(json.dumps({"content_key": other.key(), "spec": other.to_dict(), "prepared": False}))
    (out / "zarr.json").write_text("{}")                     # what the failed start got to write
    result = build_tiny(out, n=4, chunk_images=4)
    assert result.manifest["counts"]["images"] == 4 and result.manifest["compression"] is None
    out2 = tmp_path / "d"
    out2.mkdir()
    (out2 / BUILD_STATE).write_text(json.dumps({"content_key": other.key(), "spec": other.to_dict(), "prepared": True}))
    with pytest.raises(CacheError, match=r"unfinished build of other settings \(--compress: 'zstd:5' -> None"):
        build_tiny(out2, n=4, chunk_images=4)


def test_a_vanished_file_does_not_blame_space_or_permissions(tmp_path):
    gone = write_failure(OSError(errno.ENOENT, "No such file or directory", str(tmp_path / "shard-00001.tar")), tmp_path)
    assert "vanished" in gone and "free space" not in gone and "permissions" not in gone and "shard-00001.tar" in gone
    full = write_failure(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x")), tmp_path)
    assert "free space" in full and "rerun the same command" in full


class _KilledInWorker(FakeSource):
    """Decoding image 7 kills the DataLoader worker that does it (as the OOM killer would)."""

    def train_views(self, index: int):
        import signal
        import torch.utils.data
        if index == 7 and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().train_views(index)


def test_a_killed_decode_worker_stops_the_build_in_one_line_and_the_rerun_resumes(tmp_path):
    from spot_fast.cache import CacheError, build_cache, verify
    out = tmp_path / "c"
    spec = tiny_spec("/fake/data", "train", chunk_images=4)
    with pytest.raises(CacheError, match="an image-decoding worker stopped .*rerun the same command to resume"):
        build_cache(_KilledInWorker(12), tiny_encoder(), spec, out, batch_size=2, num_workers=1, device="cpu",
                    progress=False)
    resumed = build_cache(FakeSource(12), tiny_encoder(), spec, out, batch_size=2, num_workers=1, device="cpu",
                          progress=False)
    assert resumed.shards_resumed >= 1 and verify(out) == []        # shards 0 (images 0..3) was kept
    whole = build_cache(FakeSource(12), tiny_encoder(), spec, tmp_path / "whole", batch_size=2, num_workers=0,
                        device="cpu", progress=False)
    assert_same_tree(out, whole.path)
