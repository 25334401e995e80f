"""The one training loop of both stages (nanoGPT's shape: lr schedule, step, clip, log, checkpoint).

    run = train(TrainConfig(stage=1, cache="runs/cache", preset="coco", out="runs/teacher"))

`Trainer(cfg)` takes a resolved run (`setup.resolve_run`: data, model config, teacher,
precision), builds the model and the optimiser, and offers the per-batch API `fit()` is built on
and other drivers (the sweep) use:

    trainer.begin()                      # lock the run folder, write config.json (or resume), log
    while not trainer.done:
        trainer.step(batch)              # train_step + record: meter, log, checkpoints, end of epoch
    trainer.finish(); trainer.close()    # final checkpoint and evaluation; release the folder

A driver that times its steps may also feed `trainer.thread_tuner()` (None where the threads are
fixed) with each step's compute time, as `fit()` and the sweep do.

Public state a driver may read: `cfg`, `data` (len: steps per epoch; `.epoch(e, start)`), `state`,
`total_steps`, `done`, `val_cache`, `run`, `setup` (the resolved run), and `teacher`, which a driver
may replace with one shared by several trainers of the same teacher checkpoint.

`train_step(batch)` is `before_step` (lr, randomness, zero_grad; returns the step's `StepPlan`)
-> `forward_backward` -> `after_step` (clip, Adam, counters). Losses stay on the device and are
read every `log_every` steps (and at checkpoints), which is also where a NaN/inf loss stops the
run before it can reach a checkpoint. The progress bar ticks every step from host counters.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from spot_fast.cache import device_batches
from spot_fast.evaluate import evaluate, reconstruction_loss
from spot_fast.io import write_json_atomic
from spot_fast.errors import Interrupted
from spot_fast.model import SPOT
from spot_fast.runs import CONFIG_FILE, RunError, RunLock, step_checkpoints
from spot_fast.threads import ThreadTuner, step_work
from spot_fast.train import ddp, folder
from spot_fast.train.config import TrainConfig, TrainError
from spot_fast.train.logging import LOG_FILE, RunLog, truncate_log
from spot_fast.train.meter import Meter
from spot_fast.train.optim import adam, clip_grad_inf_norm_
from spot_fast.train.setup import intro, nan_cause, resolve_run, schedules
from spot_fast.train.state import TrainState, checkpoint, save_best, save_step, set_rng_state
from spot_fast.train.steps import StepPlan, StepRandomness


class Trainer:
    def __init__(self, cfg: TrainConfig, ranks: ddp.Ranks | None = None):
        self.tcfg, self.run = cfg, Path(cfg.out)
        self.ranks = ranks or ddp.setup(cfg.device)
        self.device = self.ranks.device
        self.setup = resolve_run(cfg, self.ranks)
        self.cfg, self.data, self.val_cache = self.setup.cfg, self.setup.data, self.setup.val_cache
        self.teacher = self.setup.teacher
        torch.manual_seed(cfg.seed)
        self.model = SPOT(self.cfg).to(self.device)
        if self.setup.tail is not None:
            self.model.load_tail(self.setup.tail)
        self.forward_model = ddp.wrap(self.model, self.ranks, cfg.compile)
        self.optimizer = adam(self.model.parameters(), lr=self.cfg.optim.lr)
        self.state = TrainState()
        self.meter: Meter | None = None         # the loss sums of a run between begin() and close()
        self.log: RunLog | None = None          # its log.jsonl / progress bar, likewise
        self.lock: RunLock | None = None        # the run folder's lock, likewise (rank 0)
        self.steps_per_epoch = len(self.data)
        if self.cfg.optim.epochs < 1:
            raise TrainError(f"optim.epochs = {self.cfg.optim.epochs}: nothing would train; give --epochs 1 or more")
        if self.steps_per_epoch == 0:
            raise TrainError(f"the training data ({self.setup.data_info['train_samples']} images) gives no batch "
                             f"of {self.batch_size} x {self.ranks.world_size} ranks: lower --batch-size")
        self.lrs, self.ce_weights = schedules(self.cfg.optim, self.steps_per_epoch,
                                              self.setup.data_info["train_samples"], self.ranks.world_size)
        # threads: the count the run starts with; tuned: the loop's step times may change it
        # (ThreadTuner; each change is a "threads" record in log.jsonl and a line of the log)
        self.config = folder.run_config(self.cfg.to_dict(), cfg.to_dict(), self.setup.data_info,
                                        self.setup.teacher_id, self.ranks.world_size,
                                        {"device": str(self.device), "precision": self.setup.precision,
                                         "threads": self.setup.threads, "threads_tuned": self.setup.threads_tuned})

    @property
    def batch_size(self) -> int:
        return self.cfg.optim.batch_size

    @property
    def work(self) -> int:
        """The step's work size, as the thread and precision policies read it."""
        return step_work(self.cfg.encoder, self.batch_size)

    def thread_tuner(self, say=None) -> ThreadTuner | None:
        """The tuner a driver's loop feeds with step times (None where the run's threads are fixed);
        its changes go to `say`, by default this run's log."""
        if not self.setup.threads_tuned:
            return None
        return ThreadTuner.for_run(None, self.work, self.device, say=say or self.threads_changed)

    def threads_changed(self, message: str) -> None:
        if self.log is not None:
            self.log.say(message)
            self.log.record("threads", self.state.step, threads=torch.get_num_threads(), why=message)

    @property
    def total_steps(self) -> int:
        """The steps of the whole run: every epoch, or --max-steps if that comes first."""
        total = self.cfg.optim.epochs * self.steps_per_epoch
        return min(total, self.tcfg.max_steps) if self.tcfg.max_steps else total

    @property
    def done(self) -> bool:
        return self.state.step >= self.total_steps

    # ------------------------------------------------------------------ one step, in three parts

    def before_step(self, batch: dict) -> StepPlan:
        """Set the step's lr, draw its randomness (a function of seed and step), clear the gradients."""
        self._require_begun("step")
        s = self.state.step
        for group in self.optimizer.param_groups:
            group["lr"] = self.lrs[s]
        rnd = StepRandomness.draw(self.cfg, self.tcfg.seed, s, batch["features"].shape[0], self.ranks.rank,
                                  self.ranks.world_size, self.device,
                                  self.teacher.cfg if self.teacher is not None else None)
        self.optimizer.zero_grad(set_to_none=True)
        return StepPlan(rnd, self.setup.autocast_dtype, self.teacher, self.ce_weights[s])

    def _require_begun(self, what: str) -> None:
        if self.meter is None:
            raise TrainError(f"Trainer.{what} before Trainer.begin(): call trainer.begin() first (fit() does both)")

    def forward_backward(self, batch: dict, plan: StepPlan) -> dict[str, torch.Tensor]:
        """The stage's model + loss on the batch, gradients into the model; detached device losses."""
        return plan.forward_backward(self.forward_model, batch)

    def after_step(self) -> None:
        """Clip the gradients (infinity norm), take the optimiser step, advance the step counters."""
        clip_grad_inf_norm_(self.model.parameters(), self.cfg.optim.clip)
        self.optimizer.step()
        self.state.step += 1
        self.state.step_in_epoch += 1

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """One optimiser step on a device batch; returns detached device tensors (loss, mse[, ce])."""
        plan = self.before_step(batch)
        out = self.forward_backward(batch, plan)
        self.after_step()
        return out

    # ------------------------------------------------------------------ run folder

    def begin(self) -> None:
        """Lock the run folder, write config.json (on --resume: check it, repair, load the newest
        intact checkpoint), open the log and the loss meter. The folder is released if this fails."""
        try:
            self._begin()
        except BaseException:
            self.close()
            raise

    def _begin(self) -> None:
        notes = []
        if self.ranks.main:
            try:
                self.lock = RunLock(self.run)
            except RunError as e:
                raise TrainError(str(e)) from None
            if self.tcfg.resume:
                folder.remove_temporaries(self.run)
        if self.tcfg.resume:
            if not step_checkpoints(self.run):
                raise TrainError(f"--resume: {self.run} holds no checkpoint to resume from; drop --resume to start")
            folder.check_unchanged(self.run, self.config)
            ckpt, _ = folder.resume_checkpoint(self.run, self.config, notes.append, self.ranks.main)
            self.load(ckpt)
            if self.ranks.main:
                folder.repair_best(self.run, self.state.best_step, self.config, notes.append)
        elif step_checkpoints(self.run):
            raise TrainError(f"{self.run} already holds checkpoints of a run: pass --resume to continue it, "
                             f"or choose another --out")
        self.ranks.barrier()
        if self.ranks.main:
            write_json_atomic(self.run / CONFIG_FILE, self.config)
            truncate_log(self.run / LOG_FILE, self.state.step)
        self.log = RunLog(self.run if self.ranks.main else None, self.total_steps, self.state.step, self.tcfg.progress)
        self.meter = Meter(self.device, self.state)
        for note in notes:
            self.log.say(note)
        self.log.say(intro(self.setup, self.steps_per_epoch, self.ranks.world_size, self.device))

    def load(self, ckpt: dict) -> None:
        """Continue from a (verified) checkpoint."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state = TrainState(**ckpt["state"])
        set_rng_state(ckpt["rng"])

    def save(self) -> Path | None:
        """A step checkpoint of the current state (rank 0 writes; the others return None)."""
        if not self.ranks.main:
            return None
        return save_step(self.run, self._checkpoint(), self.tcfg.keep_last)

    def _checkpoint(self) -> dict:
        if self.meter is not None:
            self.state.epoch_loss_sum, self.state.epoch_loss_count = self.meter.epoch_totals()
        return checkpoint(self.model, self.optimizer, self.state, self.cfg, self.tcfg.to_dict(),
                          folder.checkpoint_identity(self.config))

    # ------------------------------------------------------------------ the loop, batch by batch

    def step(self, batch: dict, wait: float = 0.0, tuner: ThreadTuner | None = None) -> dict[str, torch.Tensor]:
        """One optimiser step on the next device batch of the run, then `record` it. `wait`: the
        seconds spent waiting for the batch (the log's data_wait); `tuner` is given the step's
        compute time."""
        t0 = time.perf_counter()
        out = self.train_step(batch)
        if tuner is not None:
            tuner.observe(time.perf_counter() - t0)
        self.record(out, batch, wait)
        return out

    def record(self, out: dict[str, torch.Tensor], batch: dict, wait: float = 0.0) -> None:
        """The bookkeeping after a step's update: meter, a log line every log_every steps (and at the
        end), the NaN/inf check, step checkpoints, and the end of the epoch when this step ends it."""
        self._require_begun("record")
        self.meter.wait += wait
        self.meter.add(out, batch["features"].shape[0] * self.ranks.world_size, self.state.step)
        s = self.state.step
        self.log.tick(s, self.state.epoch)
        if s % self.tcfg.log_every == 0 or s == self.total_steps:
            self._log_window()
        epoch_done = self.state.step_in_epoch == self.steps_per_epoch
        every = self.tcfg.checkpoint_every
        if every and s % every == 0 and not epoch_done:
            self._check_finite()
            self.save()
        if epoch_done:
            self.end_epoch()

    def end_epoch(self) -> None:
        """Validate, advance the epoch, write its checkpoint (and best.pt). `record` calls it after an
        epoch's last step; a driver calls it itself when the reader runs out before that."""
        self._check_finite()
        value = float(self.ranks.mean(self.meter.epoch_mean()))
        self.meter.new_epoch()
        if self.ranks.main and self.val_cache is not None:
            value = reconstruction_loss(self.model, self.val_cache, self.tcfg.eval_batch_size, self.tcfg.seed)
            self.log.record("val", self.state.step, epoch=self.state.epoch, loss=value)
        self.state.epoch += 1
        self.state.step_in_epoch = 0
        improved = value < self.state.best
        if improved:
            self.state.best, self.state.best_step = value, self.state.step
        if self.ranks.main:
            ckpt = self._checkpoint()
            save_step(self.run, ckpt, self.tcfg.keep_last)
            if improved:
                save_best(self.run, ckpt)

    def finish(self) -> None:
        """The final checkpoint (unless the newest is of this step) and the evaluation into eval/."""
        self._require_begun("finish")
        if self.ranks.main:
            kept = step_checkpoints(self.run)
            if not kept or kept[-1].name != f"step-{self.state.step:08d}.pt":
                self.save()
            if self.val_cache is not None:
                result = evaluate(self.model, self.val_cache, orders="all", batch_size=self.tcfg.eval_batch_size,
                                  out=self.run / "eval", seed=self.tcfg.seed)
                self.log.record("eval", self.state.step, **{f"{k}/{m}": v for k in ("decoder", "slot_attention")
                                                            for m, v in result[k].items()})
                self.log.say(f"eval (all orders): decoder {_fmt(result['decoder'])} | slot attention "
                             f"{_fmt(result['slot_attention'])}")
        self.ranks.barrier()

    def close(self) -> None:
        """Close the log (and the progress bar) and release the run folder; call it after `finish`,
        or when the run stops early."""
        if self.log is not None:
            self.log.close()
            self.log = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def fit(self) -> Path:
        """begin, `step` over the reader's batches epoch by epoch, finish."""
        self.begin()
        try:
            tuner = self.thread_tuner()
            while not self.done:
                self._epoch(tuner)
            self.finish()
        except KeyboardInterrupt as stop:
            raise Interrupted(self.interrupted()) from stop
        finally:
            self.close()
        return self.run

    def interrupted(self) -> str:
        """What an interrupted run kept, and the command that continues it."""
        return folder.interrupted_message(self.run, self.tcfg, self.state.step, self.total_steps)

    def _epoch(self, tuner: ThreadTuner | None = None) -> None:
        """The reader's batches from the run's position to the end of the epoch (or of the run);
        `tuner` is given each step's compute time."""
        batches = device_batches(self.data.epoch(self.state.epoch, self.state.step_in_epoch), self.device)
        epoch = self.state.epoch
        while not self.done and self.state.epoch == epoch:
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:                   # the reader gave fewer than steps_per_epoch batches
                self.end_epoch()
                return
            self.step(batch, time.perf_counter() - t0, tuner)

    def _log_window(self) -> None:
        self._check_finite()
        values = {k: float(self.ranks.mean(v)) for k, v in self.meter.window_means().items()}
        rates = self.meter.rates()
        values.update(rates, lr=self.lrs[self.state.step - 1], epoch=self.state.epoch)
        if self.device.type == "cpu":
            values["threads"] = torch.get_num_threads()
        self.log.record("train", self.state.step, **values)
        self.log.progress(self.state.step, f"loss {values['loss']:.4f}  {rates['img_s']:.0f} img/s")
        self.meter.new_window()

    def _check_finite(self) -> None:
        bad = int(self.ranks.max(self.meter.bad_step))    # a host sync: only at log and checkpoint times
        if bad >= 0:
            last = step_checkpoints(self.run)
            where = f"the last checkpoint, of a finite loss, is {last[-1]}" if last else "no checkpoint was written yet"
            raise TrainError(f"the loss is NaN/inf at step {bad}: stopped ({where}); {nan_cause(self.cfg.optim, bad)}")


def _fmt(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.1f}" for k, v in metrics.items())


def train(cfg: TrainConfig) -> Path:
    """Train to the end; returns the run folder."""
    ranks = ddp.setup(cfg.device)
    try:
        return Trainer(cfg, ranks).fit()
    finally:
        ddp.teardown(ranks)
