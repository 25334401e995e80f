"""The one training loop of both stages (nanoGPT's shape: lr schedule, step, clip, log, checkpoint).

    run = train(TrainConfig(stage=1, cache="runs/cache", preset="coco", out="runs/teacher"))

`Trainer(cfg)` resolves the data, the model config, the model (and the stage-2 teacher) and the
optimiser. `fit()` is built on a public per-batch API that other drivers (the sweep) use too:

    trainer.begin()                      # run folder (or resume), log, meter
    while not trainer.done:
        trainer.step(batch)              # train_step + record: meter, log, checkpoints, end of epoch
    trainer.finish(); trainer.close()    # final checkpoint and evaluation

`train_step(batch)` (one optimiser step on a device batch, no host sync) is itself
`before_step` (lr, randomness, zero_grad) -> `forward_backward` -> `after_step` (clip, Adam,
counters), so a driver that runs several models' forward/backward as one (the stacked sweep)
calls the three parts and then `record`. Losses stay on the device and are read every
`log_every` steps, which is also where a NaN/inf loss stops the run (before it can reach a
checkpoint).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from spot_fast.cache import Cache, CacheError, open_cache
from spot_fast.evaluate import evaluate, reconstruction_loss
from spot_fast.model import SPOT
from spot_fast.schedules import cosine_schedule, warmup_epochs
from spot_fast.train import ddp
from spot_fast.train.config import RESUME_FREE, TrainConfig, TrainError, config_diff, model_config
from spot_fast.cache import device_batches
from spot_fast.train.data import CacheBatches, ImageBatches, StreamBatches
from spot_fast.train.logging import LOG_FILE, RunLog, truncate_log
from spot_fast.train.meter import Meter
from spot_fast.train.optim import adam, clip_grad_inf_norm_
from spot_fast.train.state import (BEST, CHECKPOINTS, TrainState, checkpoint, newest_checkpoint, read_checkpoint,
                                   save_atomic, save_step, set_rng_state, step_checkpoints, write_json_atomic)
from spot_fast.train.steps import StepRandomness, stage1_forward_backward, stage2_forward_backward
from spot_fast.train.teacher import load_teacher

CONFIG_FILE = "config.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rebuild_command(manifest: dict, path: Path, split_block: int) -> str:
    return (f"spot-fast cache {manifest['dataset']} --root {manifest['root']} --split {manifest['split']} "
            f"--split-block {split_block} --out {path}")


class Trainer:
    def __init__(self, cfg: TrainConfig, ranks: ddp.Ranks | None = None):
        cfg.validate()
        self.tcfg, self.run = cfg, Path(cfg.out)
        self.ranks = ranks or ddp.setup(cfg.device)
        self.device = self.ranks.device
        self.val_cache: Cache | None = None
        self.cfg, self.data, self.data_info, tail = self._open_data()
        torch.manual_seed(cfg.seed)
        self.model = SPOT(self.cfg).to(self.device)
        self.teacher = None
        if self.cfg.stage == 2:
            self.model.load_tail(tail)
            self.teacher = load_teacher(cfg.teacher, self.cfg, self.device)
        self.forward_model = self._wrap(self.model)
        self.optimizer = adam(self.model.parameters(), lr=self.cfg.optim.lr)
        self.state = TrainState()
        self.meter: Meter | None = None         # the loss sums of a run between begin() and close()
        self.log: RunLog | None = None          # its log.jsonl / progress bar, likewise
        self.steps_per_epoch = len(self.data)
        if self.steps_per_epoch == 0:
            raise TrainError(f"the training data ({self.data_info['train_samples']} images) gives no batch of "
                             f"{self.batch_size} x {self.ranks.world_size} ranks: lower --batch-size")
        self.lrs, self.ce_weights = self._schedules()
        self.autocast_dtype = self._precision()

    # ------------------------------------------------------------------ setup

    @property
    def batch_size(self) -> int:
        return self.cfg.optim.batch_size

    def _open_data(self):
        """(model config, batch source, data description for config.json, stage-2 tail state)."""
        t = self.tcfg
        if t.images is not None:
            return self._open_images()
        path = Path(t.train_cache) if t.train_cache else Path(t.cache) / "train"
        try:
            manifest = Cache(path).manifest
            cfg = model_config(t, manifest)
            if cfg.stage == 2 and manifest["layers"]["split_block"] is None:
                raise TrainError(f"cache {path} holds no split-layer tokens, which stage 2 trains from: rebuild "
                                 f"it with `{rebuild_command(manifest, path, cfg.encoder.split_block)}`")
            cache = open_cache(path, expect=cfg, allow_random_init=t.allow_random_init)
            val_path = Path(t.val_cache) if t.val_cache else (Path(t.cache) / "val" if t.cache else None)
            if val_path is not None and (t.val_cache or val_path.exists()):
                self.val_cache = open_cache(val_path, expect=cfg, allow_random_init=t.allow_random_init)
        except CacheError as e:
            raise TrainError(str(e)) from None
        if t.stream is not None:
            data = self._stream(manifest, cfg)
        else:
            data = CacheBatches(cache, cfg.optim.batch_size, seed=t.seed, rank=self.ranks.rank,
                                world_size=self.ranks.world_size, drop_last=t.drop_last, split_tokens=cfg.stage == 2)
        info = {"train_cache": str(path), "train_manifest_sha256": _sha256(path / "manifest.json"),
                "weights": manifest["weights"], "train_samples": cache.num_images}
        if self.val_cache is not None:
            info.update(val_cache=str(self.val_cache.path),
                        val_manifest_sha256=_sha256(self.val_cache.path / "manifest.json"))
        return cfg, data, info, cache.tail_state() if cfg.stage == 2 else None

    def _stream(self, manifest: dict, cfg) -> StreamBatches:
        from webdataset.shardlists import expand_urls
        urls = expand_urls(self.tcfg.stream)
        if manifest["format"] != "wds" or len(urls) != len(manifest["shards"]):
            raise TrainError(f"--stream gives {len(urls)} shard URLs for a {manifest['format']} cache of "
                             f"{len(manifest['shards'])} shards: stream the shards of a --format wds cache, all of "
                             f"them, in index order (shard-00000.tar, ...)")
        return StreamBatches(urls, manifest, cfg.optim.batch_size, seed=self.tcfg.seed, rank=self.ranks.rank,
                             world_size=self.ranks.world_size, split_tokens=cfg.stage == 2)

    def _open_images(self):
        from spot_fast.data.base import DatasetError
        from spot_fast.data.sources import open_source
        from spot_fast.encoders import FrozenEncoder, WeightsNotFound
        t = self.tcfg
        cfg = model_config(t)
        random_init = t.weights == "random-init"
        if random_init and not t.allow_random_init:
            raise TrainError("--weights random-init trains on the features of an untrained ViT (tests only): "
                             "pass --allow-random-init to mean it")
        try:
            source = open_source(t.dataset, t.images, "train", image_size=cfg.encoder.image_size)
            encoder = FrozenEncoder.create(cfg.encoder, weights=None if random_init else t.weights,
                                           random_init=random_init)
        except (DatasetError, WeightsNotFound) as e:
            raise TrainError(str(e)) from None
        split = cfg.encoder.split_block if cfg.stage == 2 else None
        data = ImageBatches(source, encoder, cfg.optim.batch_size, seed=t.seed, rank=self.ranks.rank,
                            world_size=self.ranks.world_size, drop_last=t.drop_last, split_block=split,
                            device=self.device)
        info = {"images": str(t.images), "dataset": t.dataset, "weights": encoder.weights_id,
                "train_samples": len(source)}
        return cfg, data, info, encoder.tail_state(split) if split is not None else None

    def _wrap(self, model: SPOT):
        """The module the steps call: DDP across ranks, torch.compile if asked."""
        wrapped = model
        if self.ranks.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return torch.compile(wrapped) if self.tcfg.compile else wrapped

    def _schedules(self) -> tuple[list[float], list[float]]:
        o, n = self.cfg.optim, self.steps_per_epoch
        warm = warmup_epochs(o.warmup_steps, self.data_info["train_samples"], self.batch_size * self.ranks.world_size)
        if warm > o.epochs:
            raise TrainError(f"the lr warm-up ({warm} epochs = optim.warmup_steps {o.warmup_steps} / "
                             f"({self.data_info['train_samples']} images / batch)) is longer than training "
                             f"({o.epochs} epochs): raise --epochs or --set optim.warmup_steps=...")
        lrs = cosine_schedule(o.lr, o.lr_min, o.epochs, n, warm)
        final = o.ce_weight if o.final_ce_weight is None else o.final_ce_weight
        return lrs, cosine_schedule(o.ce_weight, final, o.epochs, n)

    def _precision(self) -> torch.dtype | None:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tcfg.precision != "fp32"
        if self.tcfg.precision == "bf16" or (self.tcfg.precision == "auto" and cuda):
            return torch.bfloat16
        return None

    # ------------------------------------------------------------------ one step, in three parts

    def before_step(self, batch: dict) -> StepRandomness:
        """Set the step's lr, draw its randomness (a function of seed and step) and clear the gradients."""
        s = self.state.step
        for group in self.optimizer.param_groups:
            group["lr"] = self.lrs[s]
        rnd = StepRandomness.draw(self.cfg, self.tcfg.seed, s, batch["features"].shape[0], self.ranks.rank,
                                  self.ranks.world_size, self.device,
                                  self.teacher.cfg if self.teacher is not None else None)
        self.optimizer.zero_grad(set_to_none=True)
        return rnd

    def forward_backward(self, batch: dict, rnd: StepRandomness) -> dict[str, torch.Tensor]:
        """The stage's model + loss on the batch, gradients into the model; detached device losses."""
        if self.teacher is None:
            return stage1_forward_backward(self.forward_model, batch, orders=rnd.orders, noise=rnd.noise,
                                           autocast_dtype=self.autocast_dtype)
        return stage2_forward_backward(self.forward_model, self.teacher, batch,
                                       ce_weight=self.ce_weights[self.state.step], orders=rnd.orders,
                                       teacher_orders=rnd.teacher_orders, teacher_noise=rnd.teacher_noise,
                                       autocast_dtype=self.autocast_dtype)

    def after_step(self) -> None:
        """Clip the gradients (infinity norm), take the optimiser step, advance the step counters."""
        clip_grad_inf_norm_(self.model.parameters(), self.cfg.optim.clip)
        self.optimizer.step()
        self.state.step += 1
        self.state.step_in_epoch += 1

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """One optimiser step on a device batch; returns detached device tensors (loss, mse[, ce])."""
        rnd = self.before_step(batch)
        out = self.forward_backward(batch, rnd)
        self.after_step()
        return out

    # ------------------------------------------------------------------ run folder

    def run_config(self) -> dict:
        return {"model": self.cfg.to_dict(), "train": self.tcfg.to_dict(), "data": self.data_info,
                "world_size": self.ranks.world_size}

    def prepare_run(self) -> None:
        """Write config.json; on --resume check it is unchanged and load the newest checkpoint.
        `begin()` starts with it."""
        file = self.run / CONFIG_FILE
        have = step_checkpoints(self.run)
        if self.tcfg.resume:
            if not have:
                raise TrainError(f"--resume: {self.run} holds no checkpoint to resume from; drop --resume to start")
            self._check_resume(file)
            self.load(have[-1])
        elif have:
            raise TrainError(f"{self.run} already holds checkpoints of a run: pass --resume to continue it, "
                             f"or choose another --out")
        self.ranks.barrier()
        if self.ranks.main:
            self.run.mkdir(parents=True, exist_ok=True)
            write_json_atomic(file, self.run_config())
            truncate_log(self.run / LOG_FILE, self.state.step)

    def _check_resume(self, file: Path) -> None:
        if not file.is_file():
            raise TrainError(f"--resume: {file} is missing, so the run's config is unknown")
        old, new = json.loads(file.read_text()), self.run_config()
        for d in (old, new):
            d["train"] = {k: v for k, v in d["train"].items() if k not in RESUME_FREE}
        diff = config_diff(old, new)
        if diff:
            raise TrainError(f"--resume with a changed config: {', '.join(diff)} differ from {file}; "
                             f"resume with the run's own settings, or start a new run with another --out")

    def load(self, path: Path) -> None:
        ckpt = read_checkpoint(path)
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
        return checkpoint(self.model, self.optimizer, self.state, self.cfg, self.tcfg.to_dict())

    # ------------------------------------------------------------------ the loop, batch by batch

    @property
    def total_steps(self) -> int:
        """The steps of the whole run: every epoch, or --max-steps if that comes first."""
        total = self.cfg.optim.epochs * self.steps_per_epoch
        return min(total, self.tcfg.max_steps) if self.tcfg.max_steps else total

    @property
    def done(self) -> bool:
        return self.state.step >= self.total_steps

    def begin(self) -> None:
        """Prepare the run folder (or resume), open the log and the loss meter."""
        self.prepare_run()
        self.log = RunLog(self.run if self.ranks.main else None, self.total_steps, self.state.step, self.tcfg.progress)
        self.meter = Meter(self.device, self.state)
        dropped = getattr(self.data, "dropped", 0)
        self.log.say(f"training stage {self.cfg.stage}: {self.data_info['train_samples']} images, "
                     f"{self.steps_per_epoch} steps/epoch x {self.cfg.optim.epochs} epochs, batch "
                     f"{self.batch_size} x {self.ranks.world_size} rank(s), device {self.device}"
                     + (f"; {dropped} image(s) per epoch left out (a short last batch under --drop-last, "
                        f"or to keep the ranks' steps equal)" if dropped else ""))

    def step(self, batch: dict, wait: float = 0.0) -> dict[str, torch.Tensor]:
        """One optimiser step on the next device batch of the run, then `record` it. `wait`: the
        seconds spent waiting for the batch (the log's data_wait)."""
        out = self.train_step(batch)
        self.record(out, batch, wait)
        return out

    def record(self, out: dict[str, torch.Tensor], batch: dict, wait: float = 0.0) -> None:
        """The bookkeeping after a step's update: meter, a log line every log_every steps (and at the
        end), the NaN/inf check, step checkpoints, and the end of the epoch when this step ends it."""
        self.meter.wait += wait
        self.meter.add(out, batch["features"].shape[0] * self.ranks.world_size, self.state.step)
        s = self.state.step
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
        epoch_loss = float(self.ranks.mean(self.meter.epoch_mean()))
        self.meter.new_epoch()
        value = epoch_loss
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
                save_atomic(ckpt, self.run / CHECKPOINTS / BEST)

    def finish(self) -> None:
        """The final checkpoint (unless the newest is of this step) and the evaluation into eval/."""
        if self.ranks.main:
            if not step_checkpoints(self.run) or newest_checkpoint(self.run).name != f"step-{self.state.step:08d}.pt":
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
        """Close the log (and the progress bar); call it after `finish`, or when the run stops early."""
        if self.log is not None:
            self.log.close()
            self.log = None

    def fit(self) -> Path:
        """begin, `step` over the reader's batches epoch by epoch, finish."""
        self.begin()
        try:
            while not self.done:
                self._epoch()
            self.finish()
        finally:
            self.close()
        return self.run

    def _epoch(self) -> None:
        """The reader's batches from the run's position to the end of the epoch (or of the run)."""
        batches = device_batches(self.data.epoch(self.state.epoch, self.state.step_in_epoch), self.device)
        epoch = self.state.epoch
        while not self.done and self.state.epoch == epoch:
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:                   # the reader gave fewer than steps_per_epoch batches
                self.end_epoch()
                return
            self.step(batch, time.perf_counter() - t0)

    def _log_window(self) -> None:
        self._check_finite()
        values = {k: float(self.ranks.mean(v)) for k, v in self.meter.window_means().items()}
        rates = self.meter.rates()
        values.update(rates, lr=self.lrs[self.state.step - 1], epoch=self.state.epoch)
        self.log.record("train", self.state.step, **values)
        self.log.progress(self.state.step, f"loss {values['loss']:.4f}  {rates['img_s']:.0f} img/s")
        self.meter.new_window()

    def _check_finite(self) -> None:
        bad = int(self.ranks.max(self.meter.bad_step))    # a host sync: only at log and checkpoint times
        if bad >= 0:
            last = step_checkpoints(self.run)
            where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
            raise TrainError(f"the loss is NaN/inf at step {bad}: stopped ({where}); lower --lr or check the data")


def _fmt(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.1f}" for k, v in metrics.items())


def train(cfg: TrainConfig) -> Path:
    """Train to the end; returns the run folder."""
    ranks = ddp.setup(cfg.device)
    try:
        return Trainer(cfg, ranks).fit()
    finally:
        ddp.teardown(ranks)
