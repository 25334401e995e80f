"""Stage 1 beside a busy neighbour: what a shared machine (a laptop, a workstation, a cluster node
with data-loader workers) does to the step, under spot-fast's thread policy and under torch's
default threads.

The neighbour is one process per usable core spinning in a Python loop (no I/O, no sleeps), of two
kinds, each timed:
- "other sessions": each spinner in a session of its own, as another user's job or a command in
  another terminal is;
- "this session": the spinners in the bench's own session, as data workers or a job started from
  the same shell are.
Linux's scheduler (autogroup) shares the CPU between sessions first, so the two differ. Beside one
busy session per core, the bench's session gets cores / (cores + 1) cores in all, whatever its
thread count (2/3 of a core on 2 cores); beside spinners of its own session, each of its threads
gets a share. `cores` in the JSON is the CPU time the step actually got per second of wall time,
`fair_cores` what a fair scheduler owes it (`fair_cores()`), and `of_fair_share` its img/s over the
quiet img/s scaled to that CPU: 100% means the step lost nothing but the CPU the neighbours are
owed.
Each neighbour ends itself after `NEIGHBOUR_LIMIT_S` and is killed when the measurement ends,
failed or not.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext

import torch

from spot_fast.bench.timing import measure
from spot_fast.threads import ThreadTuner, configure_threads, step_work, usable_cores

NEIGHBOUR_LIMIT_S = 900
ROUNDS = 2            # rounds of (quiet, each neighbour kind) blocks per setting
NEIGHBOURS = {"other sessions": True, "this session": False}    # kind -> a session of its own
_SPIN = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n"


@contextmanager
def busy_neighbours(count: int, limit_s: float = NEIGHBOUR_LIMIT_S, own_session: bool = True):
    """`count` spinning processes for the duration of the block (and never longer than limit_s),
    each in a session of its own (`own_session`) or in this process's."""
    procs = [subprocess.Popen([sys.executable, "-c", _SPIN.format(limit=limit_s)], start_new_session=own_session)
             for _ in range(count)]
    try:
        time.sleep(0.5)                       # running before the first timed step
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def contended_section(row, cfg, batch: int, device: torch.device, warmup: int, repeats: int,
                      threads: int | None, default_threads: int, precision: str = "fp32") -> dict:
    """{setting: {threads, quiet_img_s, quiet_cores, contended: {kind: {img_s, share, cores}}}} for
    the thread policy (or --threads) and torch's default: the stage-1 `row` timed quiet and beside
    each kind of neighbour (one per usable core), in ROUNDS rounds of blocks of `repeats` steps
    (medians over the rounds). In each block the policy chooses as a run started then would: the
    start choice, then its `ThreadTuner`'s trial over the row's own steps (untimed), then the
    timed steps at what the trial kept; `threads` records each block's count."""
    out = {}
    work = step_work(cfg.encoder, batch)            # as the trainer computes it
    settings = {"policy": lambda: _tuned(row, threads, work, device),
                "torch default": lambda: _set(default_threads)}
    blocks = ("quiet", *NEIGHBOURS)
    for name, choose in settings.items():
        times = {b: [] for b in blocks}
        cores = {b: [] for b in blocks}
        chosen = {b: [] for b in blocks}
        for _ in range(ROUNDS):                   # the blocks alternate: drift falls on all of them
            for block in blocks:
                with (nullcontext() if block == "quiet" else
                      busy_neighbours(usable_cores(), own_session=NEIGHBOURS[block])):
                    chosen[block].append(choose())
                    _timed(row, device, warmup, repeats, times[block], cores[block])
        quiet, quiet_cores = statistics.median(times["quiet"]), statistics.median(cores["quiet"])
        out[name] = {"threads": {b: c[0] if len(set(c)) == 1 else c for b, c in chosen.items()},
                     "quiet_img_s": batch / quiet, "quiet_cores": quiet_cores, "contended": {}}
        for kind, own in NEIGHBOURS.items():
            busy = statistics.median(times[kind])
            fair = fair_cores(min(chosen[kind]), usable_cores(), usable_cores(), own, autogroup())
            out[name]["contended"][kind] = {
                "img_s": batch / busy, "share": quiet / busy,          # share: of the quiet img/s
                "cores": statistics.median(cores[kind]), "fair_cores": fair,
                # of the quiet speed scaled to the CPU the scheduler owes the step
                "of_fair_share": quiet / busy / min(1.0, fair / quiet_cores)}
    configure_threads(threads, work=work)
    return {"neighbours": usable_cores(), "precision": precision, "autogroup": autogroup(), "rows": out}


def fair_cores(threads: int, neighbours: int, cores: int, own_session: bool, autogroup: bool) -> float:
    """The CPU (in cores) a fair scheduler owes a step of `threads` busy threads beside `neighbours`
    spinning processes on `cores` cores. Per task (the neighbours in this session, or no autogroup):
    each runnable thread an equal part. Per session (autogroup, each neighbour a session of its
    own): the sessions share first, so this one gets cores / (neighbours + 1) whatever its threads."""
    if own_session and autogroup:
        return min(threads, cores / (neighbours + 1))
    return min(threads, cores * threads / (threads + neighbours))


def autogroup(path: str = "/proc/sys/kernel/sched_autogroup_enabled") -> bool:
    """Whether Linux shares the CPU between sessions first (autogroup; False where it cannot be read)."""
    try:
        with open(path) as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def _timed(row, device, warmup: int, repeats: int, times: list, cores: list) -> None:
    """One block: the median step seconds into `times`, the CPU time it got per wall second into `cores`."""
    c0, t0 = time.process_time(), time.perf_counter()
    seconds = measure({"row": row}, device, warmup, repeats)["row"].seconds
    cores.append((time.process_time() - c0) / (time.perf_counter() - t0))
    times.append(statistics.median(seconds))


def _tuned(row, threads: int | None, work: int, device) -> int:
    """The policy as a run applies it: the start choice, then the tuner's trial on `row`'s steps."""
    n = configure_threads(threads, work=work)
    tuner = ThreadTuner.for_run(threads, work, device)
    while tuner is not None and tuner.trying:
        t0 = time.perf_counter()
        row()
        tuner.observe(time.perf_counter() - t0)
    return torch.get_num_threads() if tuner is not None else n


def _set(n: int) -> int:
    torch.set_num_threads(n)
    return n
