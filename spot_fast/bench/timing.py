"""Timing for the bench: warm-up, device synchronisation, repeats interleaved across the
compared paths (so a noisy neighbour slows them alike), median and spread, peak memory."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)   # one entry per timed repeat
    peak_bytes: int | None = None                        # peak device memory (CUDA only)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> tuple[float, float]:
        """(min, max) of the repeats."""
        return min(self.seconds), max(self.seconds)

    def to_dict(self) -> dict:
        lo, hi = self.spread
        return {"median_s": self.median, "min_s": lo, "max_s": hi, "repeats": self.seconds,
                "peak_memory_gib": None if self.peak_bytes is None else self.peak_bytes / 2**30}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int = 1,
            repeats: int = 3) -> dict[str, Timing]:
    """Time every fn `repeats` times after `warmup` untimed calls, round-robin over the fns."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out = {name: Timing() for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            out[name].seconds.append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                out[name].peak_bytes = max(out[name].peak_bytes or 0, peak)
    return out
