"""The peak FLOP/s that MFU divides by: one per precision a row computes in.

- GPU: the datasheet's dense peak of the row's precision: fp32 (the reference rows: its code
  leaves TF32 off, as torch's default matmul precision does), tf32 (fp32 rows with TF32 matmuls
  enabled), bf16 (autocast rows).
- CPU: the measured rate of a 1024^3 matmul in the row's dtype with the bench's threads (the
  best of 20): what this CPU's matrix units actually deliver, AVX-512, AVX512-BF16 or AMX included,
  at the clock it runs at. A datasheet figure for a CPU depends on cores, clock and ISA, none of
  which the bench can trust from /proc/cpuinfo on a shared or virtual machine.
"""
from __future__ import annotations

import time

import torch


# Dense peaks (FLOP/s) of GPUs we know: {name fragment: {precision: peak}} (SXM parts' datasheets).
GPU_PEAKS = {
    "H200": {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989e12},
    "H100": {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989e12},
    "A100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12},
    "L40S": {"fp32": 91.6e12, "tf32": 183e12, "bf16": 362e12},
    "A10": {"fp32": 31.2e12, "tf32": 62.5e12, "bf16": 125e12},
}


def matmul_rate(dtype: torch.dtype, n: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of the best of `repeats` n x n x n matmuls on the CPU (current torch threads)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def peak(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s, how it was found) for rows computing in `precision` (fp32 | tf32 | bf16)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = next((v for k, v in GPU_PEAKS.items() if k in name), None)
        if table is None:
            return None, f"{name}: peak unknown"
        return table[precision], f"{name} dense {precision} datasheet peak"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    rate = matmul_rate(dtype)
    return rate, f"measured {precision} 1024^3 matmul, {torch.get_num_threads()} threads: {rate / 1e9:.0f} GFLOP/s"
