"""Which samples each rank reads at each step of an epoch: pure numpy, no I/O.

A true global per-sample shuffle, deterministic in (seed, epoch):

    perm  = default_rng([seed, epoch, 1]).permutation(num_samples)
    views = default_rng([seed, epoch, 2]).integers(num_views, size=num_samples)   # by row

With G = world_size * batch_size, global step i is perm[i*G:(i+1)*G] and rank r takes the
contiguous slice [r*b:(r+1)*b] of it, so the union over ranks of step i is step i of a 1-rank
run with batch G. The last global batch with n < G samples is dropped when drop_last; otherwise
each rank takes n // world_size of them and the n % world_size left over (at most
world_size - 1 per epoch) are not read this epoch; a step with n // world_size == 0 does not exist.
"""
from __future__ import annotations

import numpy as np


def _check(num_samples: int, batch_size: int, rank: int, world_size: int, num_views: int) -> None:
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size - 1}] for world_size {world_size}, got {rank}")
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")


def _batch_sizes(num_samples: int, batch_size: int, world_size: int, drop_last: bool) -> tuple[int, int]:
    """(number of full steps, per-rank size of the short last step or 0 if there is none)."""
    full, rest = divmod(num_samples, batch_size * world_size)
    tail = 0 if drop_last else rest // world_size
    return full, tail


def num_batches(num_samples: int, batch_size: int, *, seed: int = 0, epoch: int = 0,
                rank: int = 0, world_size: int = 1, drop_last: bool = False,
                num_views: int = 1) -> int:
    """How many batches `epoch_batches` gives with the same arguments (the same for every rank)."""
    _check(num_samples, batch_size, rank, world_size, num_views)
    full, tail = _batch_sizes(num_samples, batch_size, world_size, drop_last)
    return full + (tail > 0)


def dropped_samples(num_samples: int, batch_size: int, *, world_size: int = 1,
                    drop_last: bool = False) -> int:
    """How many samples no rank reads in one epoch (for the log)."""
    full, tail = _batch_sizes(num_samples, batch_size, world_size, drop_last)
    return num_samples - (full * batch_size + tail) * world_size


def epoch_batches(num_samples: int, batch_size: int, *, seed: int, epoch: int,
                  rank: int = 0, world_size: int = 1, drop_last: bool = False,
                  num_views: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """This rank's batches of one epoch, in order: (rows (b,) int64, views (b,) int64)."""
    _check(num_samples, batch_size, rank, world_size, num_views)
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    perm = np.random.default_rng([seed, epoch, 1]).permutation(num_samples).astype(np.int64)
    views = np.random.default_rng([seed, epoch, 2]).integers(num_views, size=num_samples, dtype=np.int64)
    full, tail = _batch_sizes(num_samples, batch_size, world_size, drop_last)
    G = batch_size * world_size
    out = []
    for i in range(full):
        rows = perm[i * G + rank * batch_size: i * G + (rank + 1) * batch_size]
        out.append((rows, views[rows]))
    if tail:
        start = full * G + rank * tail
        rows = perm[start: start + tail]
        out.append((rows, views[rows]))
    return out
