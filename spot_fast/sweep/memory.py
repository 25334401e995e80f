"""How much memory a sweep needs, and a refusal before starting when it cannot fit.

Per variant: its weights, gradients and Adam's two moments (4 fp32 copies of the parameters),
all alive for the whole sweep. Activations: what autograd saves for the backward pass, measured by
running the variant's forward at batch 1 and 2 on the CPU (saved-tensor bytes are affine in the
batch) and extrapolating. Variants that run one after another on a batch free their activations
before the next starts, so only the largest counts; a stacked group holds all of its members'
activations at once, plus the stacked copy of their weights and its gradient.

The CPU measurement uses the PyTorch reference paths, which save at least as much as the fused
CUDA kernels, so the estimate errs on the safe side. `HEADROOM` covers the allocator's slack and
the transient buffers of the backward pass.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass

import torch

from spot_fast.config import OptimConfig, SPOTConfig
from spot_fast.model import SPOT

HEADROOM = 1.25     # estimate x this must fit in the free memory
GIB = 2 ** 30


@dataclass(frozen=True)
class VariantMemory:
    params: int            # number of trained parameters
    state_bytes: int       # weights + gradients + Adam moments, fp32
    act_fixed: int         # saved activations that do not grow with the batch (bytes)
    act_per_sample: int    # saved activation bytes per sample of the batch

    def activations(self, batch_size: int) -> int:
        return self.act_fixed + self.act_per_sample * batch_size


def _saved_bytes(model: SPOT, batch_size: int, bf16: bool) -> int:
    """Bytes autograd saves in one training forward at this batch size (parameters excluded)."""
    cfg = model.cfg
    N, D = cfg.encoder.num_patches, cfg.feature_dim
    prefix = 1 + cfg.encoder.spec.num_registers if cfg.stage == 2 else 0
    inputs = torch.randn(batch_size, prefix + N, D)
    target = torch.randn(batch_size, N, D) if cfg.stage == 2 else None
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(inputs, target=target)                   # the config's training orders
    return sum(seen.values())


@functools.lru_cache(maxsize=64)
def _measure(cfg_json: str, bf16: bool) -> VariantMemory:
    cfg = SPOTConfig.from_dict(json.loads(cfg_json))
    model = SPOT(cfg).train()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    one, two = _saved_bytes(model, 1, bf16), _saved_bytes(model, 2, bf16)
    return VariantMemory(params=n, state_bytes=4 * 4 * n, act_fixed=max(2 * one - two, 0),
                         act_per_sample=two - one)


def variant_memory(cfg: SPOTConfig, precision: str = "fp32") -> VariantMemory:
    """The memory profile of one variant (measured once per model configuration and precision)."""
    model_only = dataclasses.replace(cfg, optim=OptimConfig())   # the optimiser does not matter here
    return _measure(json.dumps(model_only.to_dict(), sort_keys=True), precision == "bf16")


def sweep_bytes(groups: list[list[SPOTConfig]], batch_size: int, precision: str = "fp32",
                stacked: bool = False, teachers: tuple[SPOTConfig, ...] = ()) -> int:
    """Peak bytes of a sweep: every variant's state, plus the largest group's activations
    (a group of one when not stacked), plus the shared batch and the stage-2 teachers' weights
    (one per distinct teacher: a shared teacher counts once)."""
    profiles = [[variant_memory(c, precision) for c in g] for g in groups]
    state = sum(p.state_bytes for g in profiles for p in g)
    if stacked:
        peak = max(sum(p.activations(batch_size) + p.state_bytes // 2 for p in g) for g in profiles)
    else:
        peak = max(p.activations(batch_size) for g in profiles for p in g)
    cfg = groups[0][0]
    batch = 3 * batch_size * (cfg.encoder.num_patches + 1) * cfg.feature_dim * 4
    shared = batch + sum(4 * variant_memory(t, precision).params for t in teachers)
    return state + peak + shared


def free_bytes(device: torch.device) -> int:
    """Free memory where the sweep will run: the CUDA device's, else the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def how_many_fit(groups: list[list[SPOTConfig]], batch_size: int, free: int, precision: str = "fp32",
                 stacked: bool = False, teachers: tuple[SPOTConfig, ...] = ()) -> int:
    """How many of the variants, taken in order, fit in `free` bytes (with HEADROOM)."""
    total = sum(len(g) for g in groups)
    for n in range(total, 0, -1):
        if sweep_bytes(_first(groups, n), batch_size, precision, stacked, teachers) * HEADROOM <= free:
            return n
    return 0


def check_fits(groups: list[list[SPOTConfig]], batch_size: int, device: torch.device,
               precision: str = "fp32", stacked: bool = False, teachers: tuple[SPOTConfig, ...] = (),
               free: int | None = None) -> int:
    """The estimated peak bytes; MemoryError naming how many variants would fit when it does not."""
    free = free_bytes(device) if free is None else free
    need = sweep_bytes(groups, batch_size, precision, stacked, teachers)
    if need * HEADROOM <= free:
        return need
    fit = how_many_fit(groups, batch_size, free, precision, stacked, teachers)
    raise MemoryError(
        f"the sweep needs about {need * HEADROOM / GIB:.1f} GiB for {sum(len(g) for g in groups)} variants at "
        f"batch {batch_size} ({precision}) but {device} has {free / GIB:.1f} GiB free: {fit} of these variants "
        f"would fit; split the grid or lower --batch-size")


def _first(groups: list[list[SPOTConfig]], n: int) -> list[list[SPOTConfig]]:
    out = []
    for g in groups:
        if n <= 0:
            break
        out.append(g[:n])
        n -= len(out[-1])
    return out
