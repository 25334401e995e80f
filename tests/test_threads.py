"""The thread policy (spot_fast/threads.py): the cores this process may use, one thread for small
work, no more threads than the machine has idle cores, and `--threads` as given."""
from __future__ import annotations

from pathlib import Path

import pytest

from spot_fast import threads
from spot_fast.threads import SMALL_WORK, busy_cores, cgroup_cpus, choose_threads


class Stat:
    """A /proc/stat whose procs_running takes the given values, one per read."""

    def __init__(self, *running: int):
        self.values = list(running)

    def read_text(self) -> str:
        return f"cpu  1 2 3\nprocs_running {self.values.pop(0)}\nprocs_blocked 0\n"


def test_busy_cores_is_the_least_look_less_this_process():
    assert busy_cores(Stat(3, 3, 3), looks=3, gap_s=0) == 2
    assert busy_cores(Stat(5, 1, 4), looks=3, gap_s=0) == 0          # a passing burst is not a neighbour
    assert busy_cores(Path("/nonexistent/stat"), looks=2, gap_s=0) == 0


def test_cgroup_quota_v2_v1_and_none(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpus(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpus(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpus(v1) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpus(v1) is None


@pytest.mark.parametrize("cores, usable, busy, reader, want", [
    (2, 2, 0, 0, 2),          # a quiet 2-core box: both cores
    (2, 2, 2, 0, 1),          # a neighbour on every core: one thread, never zero
    (8, 8, 3, 0, 5),          # three busy cores: the five idle ones
    (8, 8, 0, 2, 6),          # the reader's copy threads keep cores of their own
    (128, 8, 100, 0, 8),      # a big shared host: this process's share still bounds it
])
def test_threads_follow_usable_idle_cores_and_the_reader(monkeypatch, cores, usable, busy, reader, want):
    monkeypatch.setattr(threads.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(threads, "usable_cores", lambda: usable)
    monkeypatch.setattr(threads, "busy_cores", lambda: busy)
    assert choose_threads(None, work=SMALL_WORK, reader_threads=reader) == want
    assert choose_threads(None, work=SMALL_WORK - 1, reader_threads=reader) == 1     # small work: one
    assert choose_threads(3, work=SMALL_WORK) == 3                                   # --threads 3 as given
