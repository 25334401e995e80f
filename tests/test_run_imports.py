"""Run loading sits below both the trainer and evaluation: evaluating or predicting with a run
loads no part of the trainer or the sweep."""
from __future__ import annotations

import subprocess
import sys

from train_case import REPO, run_env


def test_evaluation_and_prediction_import_nothing_of_the_trainer():
    code = ("import sys; import spot_fast.evaluate, spot_fast.predict, spot_fast.runs, spot_fast.io; "
            "print(sorted(m for m in sys.modules if m.startswith(('spot_fast.train', 'spot_fast.sweep'))))")
    res = subprocess.run([sys.executable, "-c", code], env=run_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
