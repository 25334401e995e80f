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


class Machine:
    """Step times by thread count, which the test changes as neighbours come and go; records every
    thread count the tuner sets."""

    def __init__(self, times: dict[int, float]):
        self.times, self.threads, self.set = dict(times), None, []

    def set_threads(self, n: int) -> None:
        self.threads = n
        self.set.append(n)

    def run(self, tuner, steps: int, wake: float = 5.0) -> None:
        for _ in range(steps):
            t = self.times[self.threads]
            # the first step after a switch is slow (threads waking): a trial must not count it
            tuner.observe(t * wake if tuner.trying and tuner.trial_step == 0 else t)


def test_tuner_keeps_the_fastest_count_and_follows_a_neighbour_that_comes_and_goes():
    from spot_fast.threads import ThreadTuner

    quiet, neighbour = {1: 1.0, 2: 0.6}, {1: 1.4, 2: 2.0}      # two threads collapse beside a neighbour
    m, said = Machine(quiet), []
    tuner = ThreadTuner([1, 2], start=1, say=said.append, set_threads=m.set_threads)
    m.run(tuner, 2 * ThreadTuner.TRIAL_STEPS)
    assert m.threads == 2 and not tuner.trying and len(said) == 1
    assert m.set == [1, 2]                                    # start, the trial's second count, kept
    m.run(tuner, 100)                                         # steady: no trial, no switch
    assert m.set == [1, 2]
    m.times = neighbour
    m.run(tuner, ThreadTuner.MIN_HOLD + 2 * ThreadTuner.TRIAL_STEPS + ThreadTuner.WINDOW)
    assert m.threads == 1 and "moved" in said[-1]
    m.times = quiet
    m.run(tuner, ThreadTuner.MIN_HOLD + 2 * ThreadTuner.TRIAL_STEPS + ThreadTuner.WINDOW)
    assert m.threads == 2
    assert [n for _, n, _ in tuner.changes] == [2, 1, 2]


def test_tuner_holds_through_noise_below_the_drift():
    from spot_fast.threads import ThreadTuner

    m = Machine({1: 1.0, 2: 0.5})
    tuner = ThreadTuner([1, 2], start=2, set_threads=m.set_threads)
    m.run(tuner, 2 * ThreadTuner.TRIAL_STEPS)
    switches = len(m.set)
    for i in range(200):                                       # +-15 % around the trial's time
        tuner.observe(0.5 * (1 + 0.15 * (-1) ** i))
    assert len(m.set) == switches and m.threads == 2 and len(tuner.changes) == 1


@pytest.mark.parametrize("requested, work, device, usable, tuned", [
    (None, SMALL_WORK, "cpu", 2, True),
    (2, SMALL_WORK, "cpu", 2, False),                 # --threads is kept as given
    (None, SMALL_WORK - 1, "cpu", 8, False),          # one thread is fastest for small work
    (None, SMALL_WORK, "cuda", 8, False),
    (None, SMALL_WORK, "cpu", 1, False),
])
def test_which_runs_are_tuned(monkeypatch, requested, work, device, usable, tuned):
    import torch
    from spot_fast.threads import ThreadTuner, tunes

    monkeypatch.setattr(threads, "usable_cores", lambda: usable)
    monkeypatch.setattr(threads, "busy_cores", lambda: 0)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: usable)
    assert tunes(requested, work, torch.device(device)) is tuned
    before = torch.get_num_threads()
    try:
        threads.configure_threads(requested, work=work)        # as a run sets them before its loop
        tuner = ThreadTuner.for_run(requested, work, torch.device(device))
        assert (tuner is not None) is tuned
        if tuner is not None:
            assert tuner.candidates == sorted({1, usable // 2, usable}) and tuner.threads == usable
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def tuned_two_cores(monkeypatch):
    """Two idle usable cores and every work size tuned; torch's threads restored afterwards."""
    import torch
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda: 0)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads, "SMALL_WORK", 1)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_tuned_run_logs_its_threads_and_says_it_in_config_json(tmp_path, tuned_two_cores, capsys):
    """A CPU run whose threads are tuned: its first line and config.json say so, every train record
    carries the threads, and the tuner's choice is a "threads" record and a line of the log."""
    import json
    from train_case import tiny_config
    from spot_fast.train import train

    run = train(tiny_config(tmp_path / "run", log_every=2))
    config = json.loads((run / "config.json").read_text())
    assert config["compute"]["threads_tuned"] is True
    printed = capsys.readouterr().out
    assert "(tuned to the step time)" in printed and "step time by threads" in printed
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(r["threads"] in (1, 2) for r in records if r["kind"] == "train")
    chosen = [r for r in records if r["kind"] == "threads"]
    assert len(chosen) >= 1 and chosen[0]["threads"] in (1, 2) and "step time by threads" in chosen[0]["why"]


def test_a_tuned_sweep_tunes_its_whole_step_once(tmp_path, tuned_two_cores, capsys):
    """A sweep's variants share the process's threads: one tuner times the whole sweep step and
    says its choice once, not one per variant."""
    from train_case import tiny_config
    from spot_fast.sweep.run import SweepConfig, sweep

    sweep(SweepConfig(train=tiny_config(tmp_path / "sweep", epochs=2), grid=["optim.lr=4e-4,2e-3"]))
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sweep threads:")]
    assert len(said) == 1 and "step time by threads" in said[0]
