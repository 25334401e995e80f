"""One bench row's figures from its timings: img/s, speed-up, FLOPs and MFU at the peak of its own precision."""
from __future__ import annotations

import torch

from spot_fast.bench.timing import Timing

TORCH_DEFAULT_THREADS = torch.get_num_threads()     # before any policy: torch's own choice


def row_precision(name: str) -> str:
    """The precision a row computes in: "<base> bf16" rows bf16, every other row fp32."""
    return "bf16" if name.endswith(" bf16") else "fp32"


def speed_rows(timings: dict[str, Timing], batch: int, step_flops: dict[str, int], peaks: dict[str, tuple],
          baseline: str = "reference") -> dict:
    """One entry per row: times, img/s, speed-up, FLOPs and MFU at the peak of its own precision."""
    base = timings[baseline].median
    out = {}
    for name, t in timings.items():
        f = step_flops.get(name.split(" ")[0])
        value, note = peaks[row_precision(name)]
        out[name] = {**t.to_dict(), "ms_per_step": 1e3 * t.median, "img_s": batch / t.median,
                     "speedup_vs_" + baseline: base / t.median, "flops_per_step": f,
                     "precision": row_precision(name), "peak_flops": value, "peak_source": note,
                     "mfu": f / t.median / value if f and value else None}
    return out
