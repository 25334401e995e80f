"""What the bench times, one callable per row, each one step (or one evaluation batch).

Reference rows: the reference code's step (`spot_fast.bench.reference`: its loader decoding the
JPEGs and every annotation mask in 4 workers, DINO's ViT inside the model, the one-order decoder
with explicit masked attention, `clip_grad_norm_(inf)` + `.item()`, Adam; stage 2 with three
encoder forwards, the teacher's full decode and the matching; evaluation with two encoder
forwards, every order and the metrics), in fp32 eager, no kernel. With `--reference-repo` the
same steps of a reference checkout's own code run in a worker process (`reference.client`).

spot-fast rows: what `spot-fast train` runs per step: the next batch of the trainer's cache reader
(`CacheBatches`) through `device_batches` (copy to the device, cast to fp32 there), the step's
randomness drawn from (seed, step), lr set, `stage1_forward_backward` / `stage2_forward_backward`
(the teacher decoding masks only), `clip_grad_inf_norm_`, fused Adam. fp32 eager, or bf16
autocast ("spot-fast bf16"); torch.compile only with --compile on; the slot-attention kernel only
where the preset enables it (`use_kernel`, off in every preset). Evaluation rows read the val
cache's reader and update the metrics as `spot-fast eval` does: "serial" with the plain decoder,
"batched" with the fast decoder and masks-only decoding.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from spot_fast.config import SPOTConfig, stage2, teacher
from spot_fast.model import SPOT
from spot_fast.train.optim import adam, clip_grad_inf_norm_
from spot_fast.train.steps import StepRandomness, stage1_forward_backward, stage2_forward_backward


@dataclass
class Options:
    device: torch.device
    precisions: tuple[str, ...] = ("fp32",)   # fast rows' precisions ("fp32", "bf16"), one row each
    compile: bool = False                     # torch.compile the fast rows' model

    def fast_names(self, base: str) -> dict[str, str]:
        """{row name: precision}: the first precision is `base`, others `base precision`."""
        return {(base if i == 0 else f"{base} {p}"): p for i, p in enumerate(self.precisions)}


def autocast_dtype(precision: str) -> torch.dtype | None:
    return torch.bfloat16 if precision == "bf16" else None


class CacheFeed:
    """The trainer's input: a cache's batches through `device_batches`, epoch after epoch."""

    def __init__(self, cache_path, batch: int, device: torch.device, split_tokens: bool, val: bool = False):
        from spot_fast.cache import open_cache
        from spot_fast.train.data import CacheBatches
        self.cache, self.device, self.val, self.epoch = open_cache(cache_path, allow_random_init=True), device, val, 0
        self.batch, self.split_tokens = batch, split_tokens
        if not val:
            self.source = CacheBatches(self.cache, batch, seed=0, rank=0, world_size=1, drop_last=True,
                                       split_tokens=split_tokens)
        self.it = self._epoch()

    def _epoch(self):
        from spot_fast.cache import device_batches
        if self.val:
            return iter(device_batches(self.cache.eval_reader(self.batch, split_tokens=self.split_tokens,
                                                            dtype=None), self.device))
        return iter(device_batches(self.source.epoch(self.epoch), self.device))

    def next(self) -> dict:
        batch = next(self.it, None)
        if batch is None:
            self.epoch += 1
            self.it = self._epoch()
            batch = next(self.it)
        return batch


class Trainee:
    """A model, its fused Adam and clipping, stepped as the trainer steps (spot_fast.train.loop)."""

    def __init__(self, model: SPOT, options: Options, precision: str, teacher_model: SPOT | None = None):
        self.model = model.to(options.device).train()
        self.device, self.teacher = options.device, teacher_model
        self.opt = adam([p for p in model.parameters() if p.requires_grad], lr=model.cfg.optim.lr)
        self.run = torch.compile(model) if options.compile else model
        self.dtype, self.step_count = autocast_dtype(precision), 0

    def step(self, batch: dict) -> dict:
        cfg = self.model.cfg
        for group in self.opt.param_groups:
            group["lr"] = cfg.optim.lr
        rnd = StepRandomness.draw(cfg, 0, self.step_count, batch["features"].shape[0], 0, 1, self.device,
                                  self.teacher.cfg if self.teacher is not None else None)
        self.opt.zero_grad(set_to_none=True)
        if self.teacher is None:
            out = stage1_forward_backward(self.run, batch, orders=rnd.orders, noise=rnd.noise,
                                          autocast_dtype=self.dtype)
        else:
            out = stage2_forward_backward(self.run, self.teacher, batch, ce_weight=cfg.optim.ce_weight,
                                          orders=rnd.orders, teacher_orders=rnd.teacher_orders,
                                          teacher_noise=rnd.teacher_noise, autocast_dtype=self.dtype)
        clip_grad_inf_norm_(self.model.parameters(), cfg.optim.clip)
        self.opt.step()
        self.step_count += 1
        return out


def train_rows(cfg: SPOTConfig, section: str, cache_path, batch: int, options: Options) -> dict[str, Callable]:
    """spot-fast's rows of stage 1 or stage 2: {row name: one step}."""
    torch.manual_seed(0)
    two = section == "stage2"
    model = SPOT(stage2(cfg) if two else cfg)
    tutor = SPOT(teacher(cfg)).to(options.device).eval().requires_grad_(False) if two else None
    feed = CacheFeed(cache_path, batch, options.device, split_tokens=two)

    def step(trainee: Trainee):
        return trainee.step(feed.next())
    return {name: partial(step, Trainee(copy.deepcopy(model), options, precision, tutor))
            for name, precision in options.fast_names("spot-fast").items()}


def eval_rows(cfg: SPOTConfig, cache_path, batch: int, options: Options) -> tuple[dict[str, Callable], Callable]:
    """spot-fast's evaluation rows on the val cache (every order, the masks' labels, the metrics),
    and a check: one batch's masks by the serial fp32 decoder against every batched row's
    ({row: {max_abs_mask_diff, argmax_agreement}})."""
    from spot_fast.evaluate import run_model
    from spot_fast.metrics import MetricAccumulator, masks_to_labels
    torch.manual_seed(0)
    batched = SPOT(stage2(cfg)).to(options.device).eval()
    serial = copy.deepcopy(batched)
    if hasattr(serial.decoder, "fast"):
        serial.decoder.fast = False
    feed = CacheFeed(cache_path, batch, options.device, split_tokens=True, val=True)
    size = feed.cache.manifest["mask_size"]
    accs = {"decoder": MetricAccumulator(), "slot_attention": MetricAccumulator()}
    generator = torch.Generator(options.device).manual_seed(0)

    @torch.no_grad()
    def evaluate(model: SPOT, precision: str | None, masks_only: bool):
        b = feed.next()
        dtype = autocast_dtype(precision or "fp32")
        with torch.autocast(options.device.type, dtype) if dtype else nullcontext():
            o = run_model(model, b, "all", generator, masks_only=masks_only)
        for kind, masks in (("decoder", o.dec_masks), ("slot_attention", o.sa_masks)):
            accs[kind].update(masks_to_labels(masks.float(), size), b["instance_mask"], b["class_mask"],
                              b["ignore_mask"])
    rows = {"serial": partial(evaluate, serial, None, False)}
    rows.update({name: partial(evaluate, batched, p, True) for name, p in options.fast_names("batched").items()})

    @torch.no_grad()
    def check() -> dict:
        b = feed.next()
        sa = cfg.slot_attention
        noise = torch.randn(b["features"].shape[0], sa.num_slots, sa.slot_size, device=options.device)
        inputs = (b["split_tokens"],)
        a = serial(*inputs, target=b["features"], orders="all", noise=noise).dec_masks
        out = {}
        for name, p in options.fast_names("batched").items():
            dtype = autocast_dtype(p)
            with torch.autocast(options.device.type, dtype) if dtype else nullcontext():
                m = batched(*inputs, target=b["features"], orders="all", noise=noise, masks_only=True).dec_masks.float()
            out[name] = {"max_abs_mask_diff": (a - m).abs().max().item(),
                         "argmax_agreement": (a.argmax(1) == m.argmax(1)).float().mean().item()}
        return out
    return rows, check


def reference_row(cfg: SPOTConfig, section: str, data, batch: int, device: torch.device, *, workers: int,
                  mask_size: int, vit_state: dict, worker=None) -> Callable:
    """The reference row of a section: the transcription in this process, or one step of a
    reference checkout's code in its worker (`worker`, a reference.client.Worker)."""
    if worker is not None:
        return partial(worker.step, section)
    from spot_fast.bench.reference.steps import SECTIONS
    torch.manual_seed(0)
    return SECTIONS[section](cfg, vit_state, data.root, batch, device, workers=workers, mask_size=mask_size)
