"""One variant's `Trainer` driven by the sweep, batch by batch.

ADAPTER. `Trainer.fit()` pulls batches from the trainer's own reader; a sweep must hand the same
device batch to every variant. `VariantRun` therefore repeats fit()'s bookkeeping around batches
it is given (run folder, log, meter, checkpoints, end-of-epoch validation, final evaluation) using
the Trainer's own methods (`prepare_run` is public; `_Meter`, `_log`, `_check_finite`,
`_end_epoch` and `_finish` are not yet), and `stacked_train_step` repeats `Trainer.train_step` for a stacked
group (lr, randomness, zero_grad -> ONE forward/backward -> clip, Adam step per variant). Both go
away once the trainer exposes `begin()` / `step(batch)` / `end()` (fit = begin, step each batch,
end) and splits `train_step` into before/forward-backward/after.
"""
from __future__ import annotations

import torch

from spot_fast.losses import stage2_loss
from spot_fast.model import SPOT
from spot_fast.sweep.stacked import StackedSPOT
from spot_fast.train.logging import RunLog
from spot_fast.train.loop import Trainer, _Meter
from spot_fast.train.steps import StepRandomness, _autocast


class SharedTeacher:
    """A frozen stage-2 teacher run once per step for every variant that uses it. Valid because the
    teacher's order and noise are `StepRandomness` of (seed, step), which all variants share."""

    def __init__(self, model: SPOT):
        self.model, self.cfg = model, model.cfg
        self._key, self._out = None, None

    def new_step(self) -> None:
        self._key, self._out = None, None

    def __call__(self, features: torch.Tensor, orders=None, noise=None, generator=None):
        key = (features.data_ptr(), orders if isinstance(orders, (int, str)) else None,
               None if noise is None else tuple(noise.shape))
        if self._out is None or key != self._key:
            self._key, self._out = key, self.model(features, orders=orders, noise=noise, generator=generator)
        return self._out


class VariantRun:
    """Trainer.fit()'s loop body, one supplied batch at a time."""

    def __init__(self, name: str, trainer: Trainer):
        self.name, self.trainer = name, trainer
        t = trainer
        total = t.cfg.optim.epochs * t.steps_per_epoch
        self.total = min(total, t.tcfg.max_steps) if t.tcfg.max_steps else total
        self.log: RunLog | None = None
        self.finished = False     # trained and evaluated before this sweep (re)started

    def begin(self) -> None:
        """Write (or, resuming, check and load) the run folder and open its log."""
        t = self.trainer
        t.prepare_run()
        evaluated = t.val_cache is None or all((t.run / "eval" / f).is_file() for f in ("metrics.json", "labels.npz"))
        self.finished = t.state.step >= self.total and evaluated
        self.log = RunLog(t.run if t.ranks.main else None, self.total, t.state.step, progress=False)
        t.meter = _Meter(t.device, t.state)

    def after_step(self, out: dict[str, torch.Tensor], batch: dict, wait: float) -> None:
        """Meter, log, step checkpoints and the end of an epoch, as Trainer._epoch does."""
        t, meter = self.trainer, self.trainer.meter
        meter.wait += wait
        meter.add(out, batch["features"].shape[0] * t.ranks.world_size, t.state.step)
        s = t.state.step
        if s % t.tcfg.log_every == 0 or s == self.total:
            t._log(meter, self.log)
        end_of_epoch = t.state.step_in_epoch == t.steps_per_epoch
        every = t.tcfg.checkpoint_every
        if every and s % every == 0 and not end_of_epoch:
            t._check_finite(meter)
            t.save()
        if end_of_epoch:
            t._end_epoch(meter, self.log)

    def finish(self) -> None:
        """The final checkpoint and evaluation (`eval/`), as at the end of Trainer.fit()."""
        if not self.finished:
            self.trainer._finish(self.log)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def stacked_train_step(trainers: list[Trainer], stacked: StackedSPOT, batch: dict) -> list[dict[str, torch.Tensor]]:
    """`Trainer.train_step` for M trainers of one architecture at the same step: ONE stacked
    forward/backward, then each trainer's own clipping and Adam step. Returns each one's losses."""
    first = trainers[0]
    s, features = first.state.step, batch["features"]
    rnds = []
    for t in trainers:
        for group in t.optimizer.param_groups:
            group["lr"] = t.lrs[s]
        t.optimizer.zero_grad(set_to_none=True)
        rnds.append(StepRandomness.draw(t.cfg, t.tcfg.seed, s, features.shape[0], t.ranks.rank,
                                        t.ranks.world_size, t.device, t.teacher.cfg if t.teacher is not None else None))
    rnd = rnds[0]                        # the students' draws: equal for one architecture and seed
    with _autocast(features.device, first.autocast_dtype):
        if first.teacher is None:
            out = stacked(features, orders=rnd.orders, noise=rnd.noise)
            total = out.loss.sum()
            results = [{"loss": loss.detach(), "mse": loss.detach()} for loss in out.loss]
        else:
            out = stacked(batch["split_tokens"], target=features, orders=rnd.orders, noise=rnd.noise)
            losses = []
            for t, r, o in zip(trainers, rnds, stacked.unstack(out)):
                with torch.no_grad():
                    masks = t.teacher(features, orders=r.teacher_orders, noise=r.teacher_noise).dec_masks
                losses.append(stage2_loss(o, masks.float(), t.ce_weights[s]))
            total = sum(loss.total for loss in losses)
            results = [{"loss": x.total.detach(), "mse": x.mse.detach(), "ce": x.ce.detach()} for x in losses]
    total.backward()
    for t in trainers:
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), t.cfg.optim.clip, norm_type="inf")
        t.optimizer.step()
        t.state.step += 1
        t.state.step_in_epoch += 1
    return results
