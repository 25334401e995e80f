"""What a run shows while it trains: the progress bar moves every step (from the host's step
count, no device value read), and without a terminal a plain line comes at a time interval."""
from __future__ import annotations

from spot_fast.train.logging import RunLog


def test_the_bar_ticks_every_step_without_a_log_line(tmp_path):
    log = RunLog(tmp_path, total_steps=10, terminal=True)
    try:
        for step in range(1, 4):
            log.tick(step, epoch=0)
            assert log.bar.tasks[0].completed == step
    finally:
        log.close()


def test_without_a_terminal_a_plain_line_comes_at_the_interval(tmp_path, capsys):
    log = RunLog(tmp_path, total_steps=10, terminal=False, plain_every=0.0)
    log.progress(2, "loss 0.5000  12 img/s")
    log.tick(3, epoch=1)
    log.close()
    assert capsys.readouterr().out.splitlines() == ["step 3/10 (epoch 2)  loss 0.5000  12 img/s"]
    quiet = RunLog(tmp_path, total_steps=10, terminal=False, plain_every=3600.0)
    quiet.tick(1, epoch=0)
    quiet.close()
    assert capsys.readouterr().out == ""
