"""One small synthetic dataset and its tiny-preset caches, built once per test session and shared
by the trainer tests (not a test module: it holds no tests).

    caches = tiny_caches()      # TinyCaches(root, both=<folder with train/ and val/>, nosplit=<train cache>)
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


IMAGE_SIZE, MASK_SIZE = 32, 16
NUM_TRAIN, NUM_VAL = 22, 6      # 22 = 5 batches of 4 + 2: batches that do not divide the data
SPLIT_BLOCK = 2
REPO = Path(__file__).resolve().parents[1]


@dataclass
class TinyCaches:
    root: Path       # the synthetic dataset (COCO layout)
    both: Path       # cache folder with train/ and val/ (fp32, split tokens of block 2)
    nosplit: Path    # a train cache without split tokens, in WebDataset shards (5 of <= 5 images)


_BUILT: dict[str, TinyCaches] = {}


def _build(root: Path, source, split: str, out: Path, split_block: int | None, fmt: str = "zarr") -> None:
    from spot_fast.cache import CacheSpec, build_cache
    from spot_fast.config import preset
    from spot_fast.encoders import FrozenEncoder
    enc_cfg = preset("tiny").encoder
    spec = CacheSpec("synthetic", str(root), split, enc_cfg,
                     "random-init:0", split_block=split_block, dtype="fp32", chunk_images=5, mask_size=MASK_SIZE,
                     format=fmt)
    encoder = FrozenEncoder.create(enc_cfg, random_init=True, seed=0)
    build_cache(source, encoder, spec, out, batch_size=8, device="cpu", progress=False)


def tiny_caches() -> TinyCaches:
    """Built on first use (a few seconds), then reused by every test of the session."""
    if "caches" not in _BUILT:
        from spot_fast.data.sources import open_source
        from spot_fast.data.synthetic import SyntheticConfig, write_synthetic
        base = Path(tempfile.mkdtemp(prefix="spot-fast-train-"))
        atexit.register(shutil.rmtree, base, ignore_errors=True)
        root = base / "data"
        write_synthetic(root, SyntheticConfig(num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=40))
        builds = (("train", SPLIT_BLOCK, base / "cache" / "train"), ("val", SPLIT_BLOCK, base / "cache" / "val"),
                  ("train", None, base / "nosplit"))
        for split, block, out in builds:
            source = open_source("synthetic", root, split, image_size=IMAGE_SIZE, mask_size=MASK_SIZE)
            _build(root, source, split, out, block, "wds" if block is None else "zarr")
        _BUILT["caches"] = TinyCaches(root, base / "cache", base / "nosplit")
    return _BUILT["caches"]


def tiny_config(out, **kw):
    """A TrainConfig for the tiny preset on the shared cache; `kw` overrides any field."""
    from spot_fast.train import TrainConfig
    base = dict(cache=str(tiny_caches().both), preset="tiny", out=str(out), epochs=3, batch_size=4,
                allow_random_init=True, progress=False, log_every=1, eval_batch_size=4, device="cpu")
    return TrainConfig(**{**base, **kw})


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "spot_fast.cli.app", *map(str, args)]


def run_env() -> dict:
    """One thread per process: bit-identical GEMMs whatever the process layout."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_cli(*args, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), env=run_env(), capture_output=True, text=True, timeout=timeout)


def sigkill_when_written(args, path: Path, timeout: float) -> int:
    """Run `spot-fast ARGS` in a subprocess and SIGKILL it (a real kill, not a simulated exit) as
    soon as `path` exists; returns its exit status (-SIGKILL when the kill landed)."""
    proc = subprocess.Popen(cli_command(*args), env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert proc.poll() is None, f"the run ended before {path.name} was written: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    return proc.returncode


def tiny_stage1_run() -> Path:
    """A finished 3-epoch stage-1 run on the shared cache (built once per session)."""
    if "stage1" not in _BUILT:
        from spot_fast.train import train
        out = Path(tempfile.mkdtemp(prefix="spot-fast-run-"))
        atexit.register(shutil.rmtree, out, ignore_errors=True)
        out = out / "teacher"
        _BUILT["stage1"] = train(tiny_config(out))
    return _BUILT["stage1"]


def train_losses(run: Path, kind: str = "train") -> list[float]:
    import json
    return [r["loss"] for r in map(json.loads, (Path(run) / "log.jsonl").read_text().splitlines())
            if r["kind"] == kind]
