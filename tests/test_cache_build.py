"""Crash-safe, honest builds: non-finite tokens refused, damaged marked shards rebuilt, a failing rank stops all."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from cache_fakes import build_tiny  # noqa: E402
from test_cache_process import SCRIPT, _free_port, assert_same_tree, run_build  # noqa: E402

from spot_fast.cache import CacheError, open_cache, verify  # noqa: E402
from spot_fast.cache.writer import FAIL_AFTER_ENV  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_nan_tokens_are_refused_naming_image_and_layer(tmp_path, dtype):
    with pytest.raises(CacheError, match=r"image 1006 \(row 6\).*final tokens hold non-finite values") as e:
        build_tiny(tmp_path / "c", n=8, scale={6: float("nan")}, dtype=dtype)
    assert "Traceback" not in str(e.value) and "rerun the same command" in str(e.value)
    assert not (tmp_path / "c" / "manifest.json").exists()
    shard0 = json.loads((tmp_path / "c" / ".shards" / "shard-00000.json").read_text())   # earlier work kept
    assert shard0["images"] == 4


def test_split_layer_is_named(tmp_path):
    with pytest.raises(CacheError, match=r"split \(input of block 2\) tokens hold non-finite"):
        build_tiny(tmp_path / "c", n=4, scale={1: float("inf")}, split_block=2)


def test_fp16_overflow_is_refused_and_bf16_stores_it(tmp_path):
    with pytest.raises(CacheError, match=r"image 1002 .*beyond fp16's range.*--dtype bf16 or fp32"):
        build_tiny(tmp_path / "a", n=4, scale={2: 1e6}, dtype="fp16")
    path = build_tiny(tmp_path / "b", n=4, scale={2: 1e6}, dtype="bf16").path
    batch = next(iter(open_cache(path, allow_random_init=True).eval_reader(4)))
    assert torch.isfinite(batch["features"]).all() and batch["features"][2].abs().max() > 65504


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_truncated_shard_marked_done_is_rebuilt_on_resume(tmp_path, fmt):
    args = {"n": 14, "format": fmt, "split_block": 2}
    out = tmp_path / "resumed"
    proc = subprocess.run([sys.executable, str(SCRIPT), json.dumps({"out": str(out), **args})],
                          env={**os.environ, FAIL_AFTER_ENV: "2", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 75, proc.stderr                  # shards 0 and 1 marked done, then killed
    marker = json.loads((out / ".shards" / "shard-00001.json").read_text())
    victim = out / sorted(marker["files"])[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])   # a crash lost its tail
    resumed = build_tiny(out, **args)
    assert resumed.shards_resumed == 1 and len(resumed.rebuilt) == 1
    assert "shard 1 (images 4..7) was marked done" in resumed.rebuilt[0]
    assert verify(out) == []
    assert_same_tree(out, build_tiny(tmp_path / "clean", **args).path)


@pytest.mark.slow
def test_failing_rank_stops_the_other_with_its_error(tmp_path):
    """Rank 1 meets a NaN image in its first shard; rank 0 must stop too (not wait at a barrier)."""
    args = {"n": 24, "chunk_images": 4, "scale": {5: float("nan")}, "out": str(tmp_path / "c")}
    port = str(_free_port())
    procs = [run_build(args, env={"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}, wait=False) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]          # a hang fails here, after 2 minutes
    assert [p.returncode for p in procs] == [1, 1], outs
    assert "image 1005 (row 5)" in outs[1][1] and "Traceback" not in outs[1][1]
    assert "build process rank-1 of 2 failed" in outs[0][1] and "image 1005" in outs[0][1]
    assert "Traceback" not in outs[0][1]
