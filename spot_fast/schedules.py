"""Per-iteration schedules of the reference trainer: linear warm-up, then cosine decay."""
from __future__ import annotations

import math


def warmup_epochs(warmup_steps: int, train_size: int, batch_size: int) -> int:
    """The reference's warm-up length in EPOCHS: int(warmup_steps / (len(train) / batch))."""
    return int(warmup_steps / (train_size / batch_size))


def cosine_schedule(base: float, final: float, epochs: int, iters_per_epoch: int,
                    warmup: int = 0, start: float = 0.0) -> list[float]:
    """One value per iteration: `warmup` epochs linear from `start` to `base` (end points
    included), then cosine from `base` towards `final` over the remaining iterations."""
    n_warm = warmup * iters_per_epoch
    total = epochs * iters_per_epoch
    if n_warm > total:
        raise ValueError(f"warm-up ({warmup} epochs) is longer than training ({epochs} epochs)")
    ramp = [start + (base - start) * i / (n_warm - 1) for i in range(n_warm)] if n_warm > 1 else [start] * n_warm
    n = total - n_warm
    decay = [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)]
    return ramp + decay
