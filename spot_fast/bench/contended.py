"""Stage 1 beside a busy neighbour: what a shared machine (a laptop, a workstation, a cluster node
with data-loader workers) does to the step, under spot-fast's thread policy and under torch's
default threads.

The neighbour is one process per usable core spinning in a Python loop (no I/O, no sleeps), each
in a session of its own, as another job on the machine is: Linux's scheduler (autogroup) shares
the CPU between sessions first, so neighbours started in the bench's own session would take
their CPU out of the bench's share and measure a load no other job puts on it. Each neighbour ends itself
after `NEIGHBOUR_LIMIT_S` and is killed when the measurement ends, failed or not.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

import torch

from spot_fast.bench.timing import measure
from spot_fast.threads import configure_threads, step_work, usable_cores

NEIGHBOUR_LIMIT_S = 900
ROUNDS = 2            # quiet/busy block pairs per setting
_SPIN = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n"


@contextmanager
def busy_neighbours(count: int, limit_s: float = NEIGHBOUR_LIMIT_S):
    """`count` spinning processes for the duration of the block (and never longer than limit_s)."""
    procs = [subprocess.Popen([sys.executable, "-c", _SPIN.format(limit=limit_s)], start_new_session=True)
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
                      threads: int | None, default_threads: int) -> dict:
    """{setting: {threads, quiet_img_s, contended_img_s, contended_share}} for the thread policy (or
    --threads) and torch's default: the fast stage-1 `row` timed quiet and beside a neighbour on
    every usable core, in ROUNDS alternating blocks of `repeats` steps (medians over the blocks).
    The policy chooses in each block, as a run started then would (quiet: the usable cores; busy:
    the idle ones); `threads` records each block's choice, quiet first."""
    out = {}
    work = step_work(cfg.encoder, batch)            # as the trainer computes it
    settings = {"policy": lambda: configure_threads(threads, work=work),
                "torch default": lambda: _set(default_threads)}
    for name, choose in settings.items():
        quiet, busy, chosen = [], [], []
        for _ in range(ROUNDS):                   # quiet and busy blocks alternate: drift falls on both
            chosen.append(choose())
            quiet += measure({"row": row}, device, warmup, repeats)["row"].seconds
            with busy_neighbours(usable_cores()):
                chosen.append(choose())
                busy += measure({"row": row}, device, warmup, repeats)["row"].seconds
        quiet, busy = statistics.median(quiet), statistics.median(busy)
        out[name] = {"threads": chosen[0] if len(set(chosen)) == 1 else chosen[:2],
                     "quiet_img_s": batch / quiet, "contended_img_s": batch / busy,
                     "contended_share": quiet / busy}   # contended img/s over quiet img/s
    configure_threads(threads, work=work)
    return {"neighbours": usable_cores(), "rows": out}


def _set(n: int) -> int:
    torch.set_num_threads(n)
    return n
