"""What the bench times: the reference's way of training and evaluating SPOT beside spot-fast's.

Reference path (what the SPOT reference code computes every step): JPEG decode + the reference's
transforms, the frozen encoder's forward, the model in fp32 eager with the plain one-order-at-a-time
decoder and no kernel, Adam. Spot-fast path: cached features -> the model (bf16 autocast + kernel +
optional compile on CUDA; fp32 eager on a CPU, and bf16 autocast beside it where the CPU
multiplies bf16 natively) -> Adam. Every path starts from the same weights.

Path names: "spot-fast" (and "batched" in evaluation) is the first fast precision; more
precisions add "spot-fast bf16" / "batched bf16".
"""
from __future__ import annotations

import copy
import io
import math
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import numpy as np
import torch
from PIL import Image

from spot_fast.config import SPOTConfig, teacher
from spot_fast.data.transforms import hflip, resize_center_crop, to_input
from spot_fast.encoders import FrozenEncoder
from spot_fast.model import SPOT
from spot_fast.train.optim import adam, clip_grad_inf_norm_
from spot_fast.train.steps import stage1_forward_backward, stage2_forward_backward


@dataclass
class Options:
    device: torch.device
    precisions: tuple[str, ...] = ("fp32",)   # fast path precisions ("fp32", "bf16"), one row each
    compile: bool = False   # torch.compile the fast path's model
    clip: float = 0.3       # gradient clipping, infinity norm (the reference's)
    lr: float = 4e-4

    @property
    def input_dtype(self) -> torch.dtype:
        """Cached features enter as bf16 when every fast path autocasts to bf16."""
        return torch.bfloat16 if set(self.precisions) == {"bf16"} else torch.float32

    def fast_names(self, base: str) -> dict[str, str]:
        """{path name: precision}: the first precision is `base`, others `base precision`."""
        return {(base if i == 0 else f"{base} {p}"): p for i, p in enumerate(self.precisions)}


def autocast_dtype(precision: str) -> torch.dtype | None:
    return torch.bfloat16 if precision == "bf16" else None


def make_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """COCO-like JPEGs: 640x480 smooth random scenes, quality 90."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((640, 480), Image.BICUBIC), np.int16)
        noisy = (img + rng.integers(-12, 13, img.shape)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class JpegBatches:
    """The reference's input path: decode B JPEGs, resize + centre crop, normalise, random flip."""

    def __init__(self, jpegs: list[bytes], batch: int, size: int, seed: int = 0):
        self.jpegs, self.batch, self.size = jpegs, batch, size
        self.rng = np.random.default_rng(seed)
        self.pos = 0

    def next(self) -> torch.Tensor:
        views = []
        for _ in range(self.batch):
            data = self.jpegs[self.pos % len(self.jpegs)]
            self.pos += 1
            x = to_input(resize_center_crop(Image.open(io.BytesIO(data)).convert("RGB"), self.size))
            views.append(hflip(x) if self.rng.random() < 0.5 else x)
        return torch.stack(views)                                           # (B, 3, H, W)


class FeatureBatches:
    """spot-fast's input: batches of a cache reader (cycled), or one synthetic batch, on device.
    Token kinds the cache lacks (split tokens of a stage-1 cache) come from the synthetic batch."""

    def __init__(self, make_reader: Callable[[], object] | None, synthetic: dict, options: Options):
        self.make_reader, self.synthetic, self.options = make_reader, synthetic, options
        self.it = iter(make_reader()) if make_reader else None
        self.dtype = options.input_dtype

    def next(self) -> dict:
        if self.it is None:
            return self.synthetic
        try:
            batch = next(self.it)
        except StopIteration:
            self.it = iter(self.make_reader())
            batch = next(self.it)
        tokens = {k: v.to(self.options.device, self.dtype, non_blocking=True)
                  for k, v in batch.items() if k in ("features", "split_tokens")}
        return {**self.synthetic, **tokens}    # a cache without split tokens: synthetic ones


def synthetic_batch(cfg: SPOTConfig, batch: int, device: torch.device, dtype=torch.float32) -> dict:
    """Features (and split tokens) of the right shapes, unit-variance like ViT tokens."""
    g = torch.Generator().manual_seed(0)
    N, D = cfg.encoder.num_patches, cfg.feature_dim
    prefix = 1 + cfg.encoder.spec.num_registers
    return {"features": torch.randn(batch, N, D, generator=g).to(device, dtype),
            "split_tokens": torch.randn(batch, prefix + N, D, generator=g).to(device, dtype)}


def reference_model(model: SPOT) -> SPOT:
    """A copy of `model` computing as the reference does: plain serial decoder, no kernel, fp32."""
    ref = copy.deepcopy(model).float()
    ref.slot_attention.cfg = replace(ref.slot_attention.cfg, use_kernel=False)
    if hasattr(ref.decoder, "fast"):           # the MLP decoder has a single path
        ref.decoder.fast = False
    return ref


def encoder_prefix(encoder: FrozenEncoder, images: torch.Tensor, blocks: int) -> torch.Tensor:
    """The frozen encoder's first `blocks` blocks: the stage-2 student's frozen part, (B, P+N, D)."""
    vit = encoder.vit
    with torch.no_grad():
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        for block in vit.blocks[:blocks]:
            x = block(x)
    return x


class Trainee:
    """A model, its Adam and gradient clipping: one optimiser step per call. The reference path
    uses torch's defaults (per-tensor Adam, `clip_grad_norm_`), the fast path the trainer's
    (`spot_fast.train.optim`: fused Adam, the same clipping computed faster)."""

    def __init__(self, model: SPOT, options: Options, fast: bool, precision: str = "fp32"):
        self.model = model.to(options.device).train()
        self.options = options
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = adam(params, lr=options.lr) if fast else torch.optim.Adam(params, lr=options.lr)
        self.clip = clip_grad_inf_norm_ if fast else partial(torch.nn.utils.clip_grad_norm_, norm_type=math.inf)
        self.run = torch.compile(model) if fast and options.compile else model
        self.autocast_dtype = autocast_dtype(precision) if fast else None

    def step(self, forward_backward: Callable[[SPOT, torch.dtype | None], dict]) -> dict:
        out = forward_backward(self.run, self.autocast_dtype)
        self.clip(self.model.parameters(), self.options.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return out


def stage1_paths(cfg: SPOTConfig, encoder: FrozenEncoder, images: JpegBatches, data: FeatureBatches,
                 options: Options) -> dict[str, Callable[[], dict]]:
    torch.manual_seed(0)
    model = SPOT(cfg)
    ref = Trainee(reference_model(model), options, False)

    def reference():
        feats = encoder(images.next().to(options.device)).final
        return ref.step(lambda m, _: stage1_forward_backward(m, {"features": feats}))

    def spot_fast(fast: Trainee):
        batch = data.next()
        return fast.step(lambda m, dtype: stage1_forward_backward(m, batch, autocast_dtype=dtype))
    return {"reference": reference,
            **{name: partial(spot_fast, Trainee(copy.deepcopy(model), options, True, precision))
               for name, precision in options.fast_names("spot-fast").items()}}


def stage2_paths(cfg: SPOTConfig, encoder: FrozenEncoder, images: JpegBatches, data: FeatureBatches,
                 options: Options) -> dict[str, Callable[[], dict]]:
    """Reference: student encoder (frozen blocks + fine-tuned tail), the frozen target encoder and
    the teacher's encoder: three encoder forwards per step. spot-fast: cached split tokens and
    final tokens (target and teacher input)."""
    torch.manual_seed(0)
    s2 = replace(cfg, slot_attention=replace(cfg.slot_attention, init="embedding", truncate="bi-level"),
                 stage=2)
    student, teacher_model = SPOT(s2), SPOT(teacher(cfg)).eval().requires_grad_(False)
    student.load_tail(encoder.vit.state_dict())
    teacher_model.to(options.device)
    ref_teacher = reference_model(teacher_model).to(options.device)
    ref = Trainee(reference_model(student), options, False)
    ce = cfg.optim.ce_weight
    split = cfg.encoder.split_block

    def reference():
        x = images.next().to(options.device)
        encoder(x)                          # the teacher's encoder (same frozen weights: same tokens)
        target = encoder(x).final           # the frozen target encoder
        batch = {"features": target, "split_tokens": encoder_prefix(encoder, x, split)}   # + student's
        return ref.step(lambda m, _: stage2_forward_backward(m, ref_teacher, batch, ce_weight=ce))

    def spot_fast(fast: Trainee):
        batch = data.next()
        return fast.step(lambda m, dtype: stage2_forward_backward(m, teacher_model, batch, ce_weight=ce,
                                                                  autocast_dtype=dtype))
    return {"reference": reference,
            **{name: partial(spot_fast, Trainee(copy.deepcopy(student), options, True, precision))
               for name, precision in options.fast_names("spot-fast").items()}}


def eval_paths(cfg: SPOTConfig, encoder: FrozenEncoder, images: JpegBatches, data: FeatureBatches,
               options: Options) -> tuple[dict[str, Callable[[], object]], Callable[[], dict]]:
    """All 9 orders: reference (JPEG + encoder + serial), serial and batched from cached features.
    Batched decodes masks only, as `spot-fast eval` does (the metrics need no reconstruction);
    serial, as the reference's evaluation, decodes everything. Also returns a check: the serial
    (fp32) and every batched path's masks of one batch, compared."""
    torch.manual_seed(0)
    batched = SPOT(cfg).to(options.device).eval()
    serial = reference_model(batched).eval()

    @torch.no_grad()
    def reference():
        return serial(encoder(images.next().to(options.device)).final, orders="all")

    @torch.no_grad()
    def serial_eval():
        return serial(data.next()["features"].float(), orders="all")

    @torch.no_grad()
    def batched_eval(precision: str, feats=None, noise=None):
        dtype = autocast_dtype(precision)
        with torch.autocast(options.device.type, dtype) if dtype else nullcontext():
            feats = data.next()["features"] if feats is None else feats
            return batched(feats, orders="all", noise=noise, masks_only=True)

    paths = options.fast_names("batched")

    @torch.no_grad()
    def check() -> dict:
        """One batch decoded serially in fp32 and by every batched path: masks must agree.
        {batched path: {max_abs_mask_diff, argmax_agreement}}."""
        feats = data.next()["features"].float()
        sa = cfg.slot_attention
        noise = torch.randn(len(feats), sa.num_slots, sa.slot_size, device=feats.device)  # same slots
        a = serial(feats, orders="all", noise=noise).dec_masks
        out = {}
        for name, precision in paths.items():
            b = batched_eval(precision, feats, noise).dec_masks.float()
            out[name] = {"max_abs_mask_diff": (a - b).abs().max().item(),
                         "argmax_agreement": (a.argmax(1) == b.argmax(1)).float().mean().item()}
        return out
    return {"reference": reference, "serial": serial_eval,
            **{name: partial(batched_eval, precision) for name, precision in paths.items()}}, check
