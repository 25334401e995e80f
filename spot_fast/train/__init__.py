"""Training both SPOT stages: the run resolved before its first step (`setup.py`), one loop
(`loop.py`), stage-specific steps (`steps.py`), checkpoint state (`state.py`), the run folder
(`folder.py`), batches from a cache or from images (`data.py`), ranks (`ddp.py`).

    from spot_fast.train import TrainConfig, train, load_run
    run = train(TrainConfig(stage=1, cache="runs/cache", preset="coco", out="runs/teacher"))
    model, cfg = load_run(run)
"""
from spot_fast.train import steps
from spot_fast.train.config import TrainConfig, TrainError
from spot_fast.train.loop import Trainer, train
from spot_fast.runs import load_run
from spot_fast.train.state import TrainState

__all__ = ["TrainConfig", "TrainError", "TrainState", "Trainer", "load_run", "steps", "train"]
