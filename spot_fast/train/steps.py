"""The model + loss of one training step, apart from the loop (as dinov2's `forward_backward`).

Each function runs the forward, calls `.backward()` on the loss and returns detached device
tensors; nothing here syncs with the host except stage 2's Hungarian matching (one copy of the
batch's cost matrices to the CPU). The per-step randomness (patch orders, slot noise) comes from
`StepRandomness`, a function of (seed, step) drawn for the GLOBAL batch, so a run on G ranks
takes the same random decisions as a run on one.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from spot_fast.config import SPOTConfig
from spot_fast.losses import stage2_loss
from spot_fast.model import SPOTOutput


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def teacher_masks(teacher, features: torch.Tensor, orders=None, noise: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The frozen teacher's decoder masks (B, K, h, w), float, without gradients."""
    with torch.no_grad():
        return teacher(features, orders=orders, noise=noise, generator=generator, masks_only=True).dec_masks.float()


def stage1_losses(out: SPOTOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the loss to differentiate, the detached losses to log) of a stage-1 forward."""
    loss = out.loss.detach()
    return out.loss, {"loss": loss, "mse": loss}


def stage2_losses(out: SPOTOutput, masks: torch.Tensor, ce_weight) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the loss to differentiate, the detached losses to log) of a stage-2 student forward
    against the teacher's decoder masks (B, K, h, w)."""
    loss = stage2_loss(out, masks, ce_weight)
    return loss.total, {"loss": loss.total.detach(), "mse": loss.mse.detach(), "ce": loss.ce.detach()}


def stage1_forward_backward(model, batch: dict, *, generator: torch.Generator | None = None,
                            noise: torch.Tensor | None = None, orders=None,
                            autocast_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Stage 1: reconstruct the frozen features from the slots. batch["features"]: (B, N, D)."""
    features = batch["features"]
    with autocast(features.device, autocast_dtype):
        total, losses = stage1_losses(model(features, orders=orders, noise=noise, generator=generator))
    total.backward()
    return losses


def stage2_forward_backward(student, teacher, batch: dict, *, ce_weight: float | torch.Tensor,
                            generator: torch.Generator | None = None, orders=None, teacher_orders=None,
                            teacher_noise: torch.Tensor | None = None,
                            autocast_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Stage 2: the frozen teacher decodes one order of batch["features"] (B, N, D); the student
    reads batch["split_tokens"] (B, 1+R+N, D) through its fine-tuned tail, reconstructs the same
    features and distils the teacher's decoder masks into its slot-attention logits."""
    features = batch["features"]
    with autocast(features.device, autocast_dtype):
        masks = teacher_masks(teacher, features, teacher_orders, teacher_noise, generator)
        out = student(batch["split_tokens"], target=features, orders=orders, generator=generator)
        total, losses = stage2_losses(out, masks, ce_weight)
    total.backward()
    return losses


def step_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed for one step's random stream (0: orders, 1: slot noise, 2: teacher)."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(2, np.uint64)[0] >> 1)


@dataclass
class StepRandomness:
    """The random decisions of one step, identical on every rank; each rank slices its rows."""
    orders: object                        # for SPOT.forward: an int, a (b,) tensor or a mode string
    noise: torch.Tensor | None            # (b, K, S) shared-Gaussian slot noise, or None
    teacher_orders: int | None = None     # stage 2: the teacher's order
    teacher_noise: torch.Tensor | None = None   # stage 2: (b, K, S) teacher slot noise

    @classmethod
    def draw(cls, cfg: SPOTConfig, seed: int, step: int, batch: int, rank: int, world_size: int,
             device, teacher_cfg: SPOTConfig | None = None) -> "StepRandomness":
        """`batch` rows per rank; the global batch is `batch * world_size`, rank r owns rows
        [r * batch, (r + 1) * batch)."""
        device = torch.device(device)
        G, rows = batch * world_size, slice(rank * batch, (rank + 1) * batch)
        cpu = torch.Generator().manual_seed(step_seed(seed, step, 0))
        orders = _orders(cfg, cpu, G, rows, device)
        noise = _noise(cfg, seed, step, 1, G, rows, device)
        if teacher_cfg is None:
            return cls(orders, noise)
        t_orders = int(torch.randint(teacher_cfg.decoder.num_orders, (1,), generator=cpu))
        return cls(orders, noise, t_orders, _noise(teacher_cfg, seed, step, 2, G, rows, device))


def _orders(cfg: SPOTConfig, cpu: torch.Generator, G: int, rows: slice, device):
    mode, P = cfg.decoder.train_orders, cfg.decoder.num_orders
    if mode == "random":
        return int(torch.randint(P, (1,), generator=cpu))
    if mode == "per_sample":
        return torch.randint(P, (G,), generator=cpu)[rows].to(device)
    return mode                                            # "standard" | "all": nothing random


def _noise(cfg: SPOTConfig, seed: int, step: int, stream: int, G: int, rows: slice, device):
    sa = cfg.slot_attention
    if sa.init != "shared_gaussian":
        return None
    g = torch.Generator(device).manual_seed(step_seed(seed, step, stream))
    return torch.randn(G, sa.num_slots, sa.slot_size, generator=g, device=device)[rows]   # (b, K, S)


@dataclass
class StepPlan:
    """What one trainer's step needs besides the batch (`Trainer.before_step` returns it): a
    driver that runs several models' forward/backward as one (the stacked sweep) reads it here."""
    randomness: StepRandomness            # the step's patch orders and slot noise
    autocast_dtype: torch.dtype | None    # bf16 autocast, or None
    teacher: object = None                # stage 2: the frozen teacher (a SPOT, or a shared wrapper)
    ce_weight: float = 0.0                # stage 2: this step's cross-entropy weight

    def forward_backward(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """The stage's model + loss on the batch, gradients into the model; detached device losses."""
        r = self.randomness
        if self.teacher is None:
            return stage1_forward_backward(model, batch, orders=r.orders, noise=r.noise,
                                           autocast_dtype=self.autocast_dtype)
        return stage2_forward_backward(model, self.teacher, batch, ce_weight=self.ce_weight, orders=r.orders,
                                       teacher_orders=r.teacher_orders, teacher_noise=r.teacher_noise,
                                       autocast_dtype=self.autocast_dtype)

    def losses(self, out: SPOTOutput, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The step's losses of a model output computed elsewhere on the same batch and draws
        (inside this plan's autocast): (the loss to differentiate, the detached losses to log)."""
        if self.teacher is None:
            return stage1_losses(out)
        r = self.randomness
        masks = teacher_masks(self.teacher, batch["features"], r.teacher_orders, r.teacher_noise)
        return stage2_losses(out, masks, self.ce_weight)
