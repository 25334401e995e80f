"""How many intra-op threads a command computes with: never more than this process may use, and
one for work too small to share.

    n = configure_threads(None, work=tokens_per_step * width)   # the policy's choice; torch uses it
    n = configure_threads(4)                                     # what `--threads 4` asks for

Why: torch's default is one thread per core the machine has. On a box that other processes also
use, every parallel region then waits for its slowest thread, and a thread that the scheduler has
put aside costs a whole time slice; small ops pay that on every region (a 22x slowdown of the
demo's training under a load of 4-6 on 2 cores, against 1 thread). So the policy counts
- the cores this process may use: its CPU affinity, and the cgroup CPU quota where one is set;
- the reader's copy threads, which want cores of their own;
- the work of one step: below `SMALL_WORK` (elements of the widest activation) one thread is
  fastest whatever the load;
- the cores other processes keep busy when the command starts (`busy_cores`: the kernel's count
  of runnable tasks, the least of a few looks, less this process): threads beyond the idle cores
  would share a core with a neighbour and stall every parallel region waiting for it.
OpenMP's waiting threads sleep instead of spinning (`OMP_WAIT_POLICY=PASSIVE`, set by the CLI
before torch loads), so an idle thread does not take a core from a neighbour.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

# Below this many elements in a step's largest activation (tokens x width), one thread wins
# even on a quiet machine: the ops are too short to amortise waking a second thread.
SMALL_WORK = 1 << 20

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"


def passive_waits() -> None:
    """Ask OpenMP to let waiting threads sleep (only effective before torch is first imported;
    a value the user set is kept)."""
    os.environ.setdefault(WAIT_POLICY_ENV, "PASSIVE")


def cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 `cpu.max`, v1 `cpu.cfs_*`), or None."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask, capped by the cgroup quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpus()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def step_work(encoder, batch: int) -> int:
    """The work size both policies read (this one and `--precision auto`'s): elements of a step's
    token batch, batch x patches x width of `encoder` (an EncoderConfig)."""
    return batch * encoder.num_patches * encoder.feature_dim


def busy_cores(stat: Path = Path("/proc/stat"), looks: int = 5, gap_s: float = 0.01) -> int:
    """Cores that other processes keep busy now: the machine's runnable tasks (`procs_running`, which
    counts this process too), the least of `looks` looks `gap_s` apart (a passing burst is not a
    neighbour), less one. 0 where /proc/stat cannot be read."""
    counts = []
    for i in range(looks):
        try:
            line = next(x for x in stat.read_text().splitlines() if x.startswith("procs_running"))
            counts.append(int(line.split()[1]))
        except (OSError, StopIteration, ValueError, IndexError):
            return 0
        if i + 1 < looks:
            time.sleep(gap_s)
    return max(0, min(counts) - 1)


def choose_threads(requested: int | None = None, work: int | None = None, reader_threads: int = 0) -> int:
    """The policy: `requested` when given; else 1 for work below SMALL_WORK; else the usable cores
    less the reader's threads, and no more than the machine's idle cores."""
    if requested is not None:
        return requested
    if work is not None and work < SMALL_WORK:
        return 1
    idle = (os.cpu_count() or 1) - busy_cores()
    return max(1, min(usable_cores() - reader_threads, idle))


def configure_threads(requested: int | None = None, work: int | None = None, reader_threads: int = 0) -> int:
    """Set torch's intra-op threads by the policy and return the number set."""
    import torch
    n = choose_threads(requested, work, reader_threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
