"""Builds across processes: a killed build resumes to the same bytes; 2 ranks build what 1 rank builds.

The builds run `tests/cache_fakes.py` in subprocesses (single-threaded torch, so every
process computes bit-identical GEMMs) and are compared file by file with an in-process build.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from cache_fakes import build_tiny  # noqa: E402

from spot_fast.cache import CacheError, open_cache, verify  # noqa: E402
from spot_fast.cache.writer import FAIL_AFTER_ENV  # noqa: E402

SCRIPT = Path(__file__).parent / "cache_fakes.py"
pytestmark = pytest.mark.usefixtures("one_thread")


def run_build(args: dict, env: dict | None = None, wait: bool = True):
    cmd = [sys.executable, str(SCRIPT), json.dumps(args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if env is None or key not in env:
            full_env.pop(key, None)
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc.wait(timeout=120) and proc if wait else proc


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_same_tree(a: Path, b: Path) -> None:
    ta, tb = tree(a), tree(b)
    assert sorted(ta) == sorted(tb)
    different = [k for k in ta if ta[k] != tb[k]]
    assert not different, f"files differ: {different}"




@pytest.mark.parametrize("fmt, dtype", [("zarr", "fp16"), ("wds", "fp16"), ("zarr", "int8"), ("wds", "fp8")])
def test_killed_build_resumes_to_identical_bytes(tmp_path, fmt, dtype):
    args = {"n": 14, "bad": [6], "format": fmt, "split_block": 2, "split": "val" if fmt == "wds" else "train",
            "dtype": dtype}
    out = tmp_path / "resumed"
    proc = subprocess.run([sys.executable, str(SCRIPT), json.dumps({"out": str(out), **args})],
                          env={**os.environ, FAIL_AFTER_ENV: "2", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 75, proc.stderr            # died half-way through its 3rd shard
    assert not (out / "manifest.json").exists()
    assert len(list((out / ".shards").iterdir())) == 2
    with pytest.raises(CacheError, match="unfinished cache build"):
        open_cache(out, allow_random_init=True)
    resumed = build_tiny(out, **args)
    assert resumed.shards_resumed == 2 and resumed.images_built == 14 - 8 and resumed.manifest["counts"]["images"] == 13
    clean = build_tiny(tmp_path / "clean", **args)
    assert_same_tree(out, clean.path)
    assert verify(out) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_two_rank_build_equals_one_rank_build(tmp_path, dtype):
    args = {"n": 18, "bad": [3], "split_block": 2, "chunk_images": 4, "out": str(tmp_path / "two"), "dtype": dtype}
    port = str(_free_port())
    procs = [run_build(args, env={"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}, wait=False) for r in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr
    built = [json.loads(stdout.strip().splitlines()[-1])["images_built"] for stdout, _ in outs]
    assert built == [9, 8]          # rank 0: shards 0, 2, 4 (one image skipped); rank 1: shards 1, 3
    one = build_tiny(tmp_path / "one", **{k: v for k, v in args.items() if k != "out"})
    assert_same_tree(tmp_path / "two", one.path)
