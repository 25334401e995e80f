"""One variant's `Trainer` driven by the sweep, batch by batch, through the Trainer's public API.

`Trainer.fit()` pulls batches from the trainer's own reader; a sweep hands the same device batch
to every variant, so `VariantRun` calls what fit() is built on: `begin()`, `step(batch)` (or, for
a stacked group, `before_step` -> one stacked forward/backward -> `after_step` -> `record`),
`finish()`, `close()`. What it adds is the sweep's own policy: a variant already trained and
evaluated before the sweep (re)started is not evaluated again.
"""
from __future__ import annotations

import torch

from spot_fast.model import SPOT
from spot_fast.sweep.stacked import StackedSPOT
from spot_fast.train.loop import Trainer
from spot_fast.train.steps import autocast


class SharedTeacher:
    """A frozen stage-2 teacher run once per step for every variant that uses it. Valid because the
    teacher's order and noise are `StepRandomness` of (seed, step), which all variants share."""

    def __init__(self, model: SPOT):
        self.model, self.cfg = model, model.cfg
        self._key, self._out = None, None

    def new_step(self) -> None:
        self._key, self._out = None, None

    def __call__(self, features: torch.Tensor, orders=None, noise=None, generator=None, masks_only=False):
        key = (features.data_ptr(), orders if isinstance(orders, (int, str)) else None,
               None if noise is None else tuple(noise.shape), masks_only)
        if self._out is None or key != self._key:
            self._key, self._out = key, self.model(features, orders=orders, noise=noise, generator=generator,
                                                   masks_only=masks_only)
        return self._out


class VariantRun:
    """A named variant's trainer and whether it was finished before this sweep (re)started."""

    def __init__(self, name: str, trainer: Trainer):
        self.name, self.trainer = name, trainer
        self.finished = False     # trained and evaluated before this sweep (re)started

    def begin(self) -> None:
        """Write (or, resuming, check and load) the run folder and open its log."""
        t = self.trainer
        t.begin()
        evaluated = t.val_cache is None or all((t.run / "eval" / f).is_file() for f in ("metrics.json", "labels.npz"))
        self.finished = t.done and evaluated

    def finish(self) -> None:
        """The final checkpoint and evaluation (`eval/`), unless the variant had them already."""
        if not self.finished:
            self.trainer.finish()

    def close(self) -> None:
        self.trainer.close()


def stacked_train_step(trainers: list[Trainer], stacked: StackedSPOT, batch: dict) -> list[dict[str, torch.Tensor]]:
    """`Trainer.train_step` for M trainers of one architecture at the same step: each one's
    `before_step` (its `StepPlan`), ONE stacked forward, each plan's losses of its model's output
    (the step functions' own), one backward, each one's `after_step` (clipping, Adam step).
    Returns each one's losses (for `Trainer.record`)."""
    plans = [t.before_step(batch) for t in trainers]
    rnd = plans[0].randomness             # the students' draws: equal for one architecture and seed
    features = batch["features"]
    stage2 = plans[0].teacher is not None
    with autocast(features.device, plans[0].autocast_dtype):
        inputs, target = (batch["split_tokens"], features) if stage2 else (features, None)
        outs = stacked.unstack(stacked(inputs, target=target, orders=rnd.orders, noise=rnd.noise))
        losses = [plan.losses(out, batch) for plan, out in zip(plans, outs)]
    sum(total for total, _ in losses).backward()
    for t in trainers:
        t.after_step()
    return [logged for _, logged in losses]
