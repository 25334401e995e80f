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

That choice is a guess made once, and the load it reads cannot say what the scheduler will give:
Linux shares the CPU between sessions first (autogroup), so two threads beside a busy neighbour in
another session get two thirds of a core between them and wait on each other (one thread is
faster), while beside a neighbour in this session (a data worker, a job started from the same
shell) they get a core's worth and beat one thread by a third. So a run's own steps decide
(`ThreadTuner`): it times a few steps at each candidate count, keeps the fastest, and tries again
when the step time moves (a neighbour came or went).
"""
from __future__ import annotations

import math
import os
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Callable

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


def tunes(requested: int | None, work: int | None, device=None, reader_threads: int = 0) -> bool:
    """Whether a run's threads are tuned (`ThreadTuner.for_run`): no --threads, on a CPU, two usable
    cores or more, work of SMALL_WORK or more."""
    if requested is not None or (device is not None and getattr(device, "type", device) != "cpu"):
        return False
    return usable_cores() - reader_threads >= 2 and (work is None or work >= SMALL_WORK)


class ThreadTuner:
    """Chooses the intra-op threads from the run's own step times.

        tuner = ThreadTuner.for_run(requested, work, device)   # None: --threads given, one core, small work
        for batch in batches:
            t0 = time.perf_counter()
            step(batch)                                         # the compute only, not the data wait
            if tuner is not None:
                tuner.observe(time.perf_counter() - t0)         # may set torch's threads for the next step

    A trial runs TRIAL_STEPS steps at each candidate (the first after a switch is not counted: it
    wakes the threads) and keeps the fastest. The choice is held; when the median of the last
    WINDOW steps moves more than DRIFT from the trial's time (and at least MIN_HOLD steps were held,
    which bounds what trials cost), the candidates are tried again. Each change is reported through
    `say` and kept in `changes` (step, threads, why). The steps of a trial are real training steps:
    nothing is recomputed, only their speed differs.
    """

    TRIAL_STEPS = 3
    WINDOW = 5
    DRIFT = 0.25
    MIN_HOLD = 20

    def __init__(self, candidates: list[int], start: int, say: Callable[[str], None] | None = None,
                 set_threads: Callable[[int], None] | None = None):
        if start not in candidates:
            raise ValueError(f"start {start} is not among the candidates {candidates}")
        self.candidates = sorted(set(candidates))
        self.threads = start
        self.say = say or (lambda message: None)
        self.set_threads = set_threads or _torch_threads
        self.steps = 0
        self.changes: list[tuple[int, int, str]] = []
        self.reference: float | None = None        # the held choice's step time in its trial
        self.recent: deque[float] = deque(maxlen=self.WINDOW)
        self.held = 0
        self._start_trial("start")

    @classmethod
    def for_run(cls, requested: int | None, work: int | None, device=None, reader_threads: int = 0,
                say: Callable[[str], None] | None = None) -> "ThreadTuner | None":
        """A tuner over {1, the policy's choice, half and all usable cores}, starting at the policy's
        choice, which `configure_threads` has set (the count torch computes with now); None where
        nothing is to choose: --threads given, a GPU, one usable core, or work below SMALL_WORK
        (one thread is fastest)."""
        import torch
        if not tunes(requested, work, device, reader_threads):
            return None
        usable = usable_cores() - reader_threads
        start = torch.get_num_threads()
        return cls([1, start, max(1, usable // 2), usable], start, say)

    def _start_trial(self, why: str) -> None:
        self.why = why
        self.queue = [self.threads] + [c for c in self.candidates if c != self.threads]
        self.times: dict[int, list[float]] = {c: [] for c in self.candidates}
        self.trial_step = 0
        self._switch(self.queue[0])

    def _switch(self, n: int) -> None:
        if n != self.threads or self.steps == 0:
            self.set_threads(n)
        self.threads = n

    @property
    def trying(self) -> bool:
        return bool(self.queue)

    def observe(self, seconds: float) -> None:
        """One step's compute time at the current threads."""
        self.steps += 1
        if self.queue:
            self.trial_step += 1
            if self.trial_step > 1:                    # the first step after a switch wakes threads
                self.times[self.queue[0]].append(seconds)
            if self.trial_step == self.TRIAL_STEPS:
                self.queue.pop(0)
                self.trial_step = 0
                if self.queue:
                    self._switch(self.queue[0])
                else:
                    self._decide()
            return
        self.recent.append(seconds)
        self.held += 1
        if self.held >= self.MIN_HOLD and len(self.recent) == self.WINDOW:
            now = statistics.median(self.recent)
            if abs(now - self.reference) > self.DRIFT * self.reference:
                self._start_trial(f"the step time moved from {self.reference:.3g} s to {now:.3g} s")

    def _decide(self) -> None:
        timed = {c: statistics.median(t) for c, t in self.times.items() if t}
        best = min(timed, key=timed.get)
        before = self.changes[-1][1] if self.changes else None
        self._switch(best)
        self.reference, self.held = timed[best], 0
        self.recent.clear()
        table = ", ".join(f"{c}: {t:.3g} s" for c, t in sorted(timed.items()))
        if best != before:
            self.changes.append((self.steps, best, self.why))
            self.say(f"threads: {best} ({self.why}; step time by threads {table})")


def _torch_threads(n: int) -> None:
    import torch
    torch.set_num_threads(n)
