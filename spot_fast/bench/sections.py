"""The bench's sections: stage 1, stage 2 and evaluation (reference beside spot-fast), the data
rates, stage 1 under contention, and the sweep against separate runs."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from spot_fast.bench import flops
from spot_fast.bench.config import bench_caches
from spot_fast.bench.rows import TORCH_DEFAULT_THREADS, speed_rows
from spot_fast.bench.timing import measure
from spot_fast.bench.workloads import Options, eval_rows, reference_row, train_rows


def run_sections(cfg, model_cfg, folder: Path, peaks: dict, result: dict, log) -> None:
    """Fill result["sections"]: every section of cfg.sections, in order."""
    device, B = torch.device(cfg.device), cfg.batch
    options = Options(device, precisions=cfg.precisions, compile=cfg.compile == "on")
    timed = [s for s in cfg.sections if s in ("stage1", "stage2", "eval", "contended", "data")]
    data = _data(cfg, model_cfg, folder, device, log) if timed else None
    result["data"] = None if data is None else {"train_cache": str(data.train_cache), "built": cfg.cache is None}
    step_flops = flops.bench_steps(model_cfg, B)
    worker = None
    try:
        if cfg.reference_repo and {"stage1", "stage2", "eval"} & set(cfg.sections):
            from spot_fast.bench.reference.client import Worker
            worker = Worker("checkout", data.root, preset=cfg.preset, batch=B, device=cfg.device,
                            threads=torch.get_num_threads(), workers=cfg.loader_workers, mask_size=cfg.mask_size,
                            repo=cfg.reference_repo)
        vit_state = None
        for name in cfg.sections:
            log(f"[bench] {name} ...")
            if name in ("stage1", "stage2", "eval"):
                if vit_state is None:
                    from spot_fast.encoders import FrozenEncoder
                    vit_state = FrozenEncoder.create(model_cfg.encoder, random_init=True, seed=0).vit.state_dict()
                ref = reference_row(model_cfg, name, data, B, device, workers=cfg.loader_workers,
                                    mask_size=cfg.mask_size, vit_state=vit_state, worker=worker)
                check = None
                if name == "eval":
                    fast, check_fn = eval_rows(model_cfg, data.val_cache, B, options)
                    check = check_fn()
                else:
                    fast = train_rows(model_cfg, name, data.train_cache, B, options)
                timings = measure({"reference": ref, **fast}, device, cfg.warmup, cfg.repeats)
                result["sections"][name] = {"paths": speed_rows(timings, B, step_flops[name], peaks)}
                if check:
                    result["sections"][name]["mask_check"] = check
                del ref
            elif name == "data":
                result["sections"]["data"] = data_section(cfg, model_cfg, data, device)
            elif name == "contended":
                from spot_fast.bench.contended import contended_section
                precision = contended_precision(cfg, model_cfg, device)
                row = train_rows(model_cfg, "stage1", data.train_cache, B, Options(device, (precision,)))["spot-fast"]
                result["sections"]["contended"] = contended_section(row, model_cfg, B, device, cfg.warmup,
                                                                    cfg.repeats, cfg.threads, TORCH_DEFAULT_THREADS,
                                                                    precision)
            elif name == "sweep":
                from spot_fast.bench.sweep import SweepBenchConfig, run_sweep_bench
                cache = None if cfg.cache is None else str(bench_caches(cfg.cache, need_val=False)[0])
                result["sections"]["sweep"] = run_sweep_bench(SweepBenchConfig(
                    variants=cfg.sweep_variants, preset=cfg.preset, cache=cache, batch_size=cfg.batch,
                    steps=cfg.sweep_steps, device=cfg.device))
    finally:
        if worker is not None:
            worker.close()


def contended_precision(cfg, model_cfg, device: torch.device) -> str:
    """The contended rows' precision: --precision fp32 / bf16 as given, else what `spot-fast train`
    computes in at this preset and batch (`--precision auto`)."""
    from spot_fast.precision import resolve_precision
    from spot_fast.threads import step_work
    if cfg.precision in ("fp32", "bf16"):
        return cfg.precision
    return resolve_precision("auto", device, step_work(model_cfg.encoder, cfg.batch))


def _data(cfg, model_cfg, folder: Path, device, log):
    from spot_fast.bench.fixtures import BenchData, make_data
    from spot_fast.bench.reference.data import write_dataset
    steps = cfg.warmup + cfg.repeats + 1
    if cfg.cache is not None:
        train, val = bench_caches(cfg.cache, need_val="eval" in cfg.sections)
        size = model_cfg.encoder.image_size
        root = write_dataset(folder / "data", 16, cfg.batch * (steps + 2 * cfg.loader_workers + 2),
                             short_side=max(size, 480) if size >= 224 else size)
        return BenchData(root, train, val)
    log("[bench] writing the data and building the caches ...")
    calls = cfg.warmup + cfg.repeats
    rows = len(cfg.precisions)                    # fast rows sharing a section's reader
    return make_data(folder, model_cfg, cfg.batch, steps=max(rows * calls, 2 * calls, cfg.data_batches + 1) + 1,
                     eval_steps=(1 + rows) * calls + 1, mask_size=cfg.mask_size, loader_workers=cfg.loader_workers,
                     device=device)


def data_section(cfg, model_cfg, data, device: torch.device) -> dict:
    """Read rates (img/s, GB/s): the reference's dataset serially (JPEG + masks + transforms, per
    loader worker), the cache reader (`data_batches` batches after a first, untimed one), a raw
    memmap of as many bytes; and the share of spot-fast's stage-1 step spent waiting for the reader."""
    from spot_fast.bench.reference.data import ReferenceCOCO
    from spot_fast.cache import open_cache
    size = model_cfg.encoder.image_size
    ds = ReferenceCOCO(data.root, "train", size, size)
    n_img = min(len(ds), cfg.data_batches * cfg.batch)
    t0 = time.perf_counter()
    for i in range(n_img):
        ds[i]
    s = time.perf_counter() - t0
    out = {"reference_dataset": {"img_s": n_img / s, "gb_s": None, "note": "one loader worker"}}
    reader = open_cache(data.train_cache, allow_random_init=True).train_reader(cfg.batch, seed=0, epoch=0, dtype=None)
    n, nbytes = 0, 0
    for i, batch in enumerate(reader):          # the first batch (threads, buffers) is not timed
        if i == 0:
            t0 = time.perf_counter()
            continue
        n += len(batch["features"])
        nbytes += sum(v.nbytes for k, v in batch.items() if k.startswith(("features", "split_tokens")))   # 8-bit: with the scales
        if i == cfg.data_batches:
            break
    s = time.perf_counter() - t0
    out["cache_reader"] = {"img_s": n / s, "gb_s": nbytes / s / 1e9}
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(np.random.default_rng(0).bytes(nbytes))
        f.flush()
        t0 = time.perf_counter()
        np.array(np.memmap(f.name, dtype=np.uint8, mode="r"))
        s = time.perf_counter() - t0
    out["raw_memmap"] = {"img_s": n / s, "gb_s": nbytes / s / 1e9}
    out["data_wait"] = data_wait(cfg, model_cfg, data, device)
    return out


def data_wait(cfg, model_cfg, data, device: torch.device) -> dict:
    """spot-fast's stage-1 step over the cache reader: the time blocked on the next batch."""
    from spot_fast.bench.workloads import CacheFeed, Trainee
    from spot_fast.model import SPOT
    feed = CacheFeed(data.train_cache, cfg.batch, device, split_tokens=False)
    trainee = Trainee(SPOT(model_cfg), Options(device), "fp32")
    wait = total = 0.0
    for i in range(cfg.data_batches):
        t0 = time.perf_counter()
        batch = feed.next()
        t1 = time.perf_counter()
        trainee.step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0:                                    # the first step pays the warm-up
            wait, total = wait + t1 - t0, total + time.perf_counter() - t0
    return {"wait_s": wait, "step_s": total, "share": wait / total if total else None}

