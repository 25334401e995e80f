"""What `--precision auto` computes in: bf16 autocast where it is both right and faster, else fp32.

    resolve_precision("auto", device, work=batch * tokens * width)   # -> "bf16" | "fp32"

- CUDA: bf16 (tensor cores; the reference trains in fp32, and bf16 lands where it does on GPUs).
- CPU: bf16 only where all three hold, else fp32:
  1. the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere oneDNN emulates it;
  2. bf16 training lands where fp32 does: `benchmarks/bf16_vs_fp32.py` trained stage 1 of the tiny
     preset on the synthetic cache over 8 seeds in each precision, and every metric's mean (last
     MSE, FG-ARI, mBO^i, mBO^c, mIoU, decoder and slot-attention masks) is within 2 standard errors
     of fp32's (`BF16_EVIDENCE`; tests/test_precision.py holds this constant to that file);
  3. the step is large enough for bf16 to be faster: on a 2-core EPYC (Zen 4, AVX512-BF16) its
     step time is 1.58x fp32's on the tiny preset (4 Ki elements per step's widest activation)
     and 1.06x on the demo's (128 Ki), but 0.36x on COCO shapes at batch 8 (1.2 Mi): small
     matmuls spend their time converting, not multiplying. `BF16_CPU_WORK` sits between.
"""
from __future__ import annotations

import functools

import torch

BF16_EVIDENCE = "benchmarks/results/bf16_vs_fp32-cpu2-20261202T183845Z.json"
BF16_LANDS_WITH_FP32 = True          # what BF16_EVIDENCE found (all metrics within 2 s.e.)
BF16_CPU_WORK = 1 << 20              # elements (batch x tokens x width) from which bf16 is faster on a CPU


@functools.cache
def cpu_flags() -> dict[str, str]:
    """The first processor's /proc/cpuinfo fields ({} where there is none)."""
    info: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            if not line.strip():
                break
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_bf16_native() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), where bf16 autocast
    pays; elsewhere oneDNN emulates it and it is slower than fp32."""
    flags = set(cpu_flags().get("flags", "").split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: torch.device, work: int | None = None) -> str:
    """"bf16" or "fp32": what `precision` ("auto" | "bf16" | "fp32") computes in on `device` for a
    step whose widest activation holds `work` elements (None: unknown, taken as small)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    large = work is not None and work >= BF16_CPU_WORK
    return "bf16" if device.type == "cpu" and large and BF16_LANDS_WITH_FP32 and cpu_bf16_native() else "fp32"
