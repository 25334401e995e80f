"""One variant's `Trainer` driven by the sweep, batch by batch, through the Trainer's public API.

`Trainer.fit()` pulls batches from the trainer's own reader; a sweep hands the same device batch
to every variant, so `VariantRun` calls what fit() is built on: `begin()`, `step(batch)` (or, for
a stacked group, `before_step` -> one stacked forward/backward -> `after_step` -> `record`),
`finish()`, `close()`. What it adds is the sweep's own policy: a variant already trained and
evaluated before the sweep (re)started is not evaluated again.
"""
from __future__ import annotations

import torch

from spot_fast.losses import stage2_loss
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
    `before_step`, ONE stacked forward/backward, each one's `after_step` (clipping, Adam step).
    Returns each one's losses (for `Trainer.record`)."""
    rnds = [t.before_step(batch) for t in trainers]
    rnd = rnds[0]                        # the students' draws: equal for one architecture and seed
    first, features = trainers[0], batch["features"]
    with autocast(features.device, first.autocast_dtype):
        if first.teacher is None:
            out = stacked(features, orders=rnd.orders, noise=rnd.noise)
            total = out.loss.sum()
            results = [{"loss": loss.detach(), "mse": loss.detach()} for loss in out.loss]
        else:
            out = stacked(batch["split_tokens"], target=features, orders=rnd.orders, noise=rnd.noise)
            losses = []
            for t, r, o in zip(trainers, rnds, stacked.unstack(out)):
                with torch.no_grad():
                    masks = t.teacher(features, orders=r.teacher_orders, noise=r.teacher_noise,
                                      masks_only=True).dec_masks
                losses.append(stage2_loss(o, masks.float(), t.ce_weights[t.state.step]))
            total = sum(loss.total for loss in losses)
            results = [{"loss": x.total.detach(), "mse": x.mse.detach(), "ce": x.ce.detach()} for x in losses]
    total.backward()
    for t in trainers:
        t.after_step()
    return results
