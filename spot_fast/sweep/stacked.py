"""M SPOT models of one architecture run as ONE batched model (torch.func: stack_module_state's
layout, functional_call + vmap), with the plain per-model loop beside it.

Which variants can stack: those whose model config is identical (`stack_key`); they may differ in
their weights and in anything the optimiser alone reads (lr, schedule, clipping, CE weight). A
different slot count, truncation, decoder or order mode is a different function or different
activation shapes, so those variants run one after another on the same device batch instead.

Each model keeps owning its parameters: every call stacks them into (M, ...) tensors (a copy,
differentiable), so `.backward()` fills each model's own `.grad` and each model's own optimiser,
clipping and checkpointing run unchanged. Randomness (shared-Gaussian noise, the decoded order)
must be drawn outside and passed in: inside vmap every model sees the same given draws, which is
what M separate runs with the same seed draw.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings

import torch
from torch.func import functional_call, vmap

from spot_fast.config import OptimConfig, SPOTConfig
from spot_fast.model import SPOT, SPOTOutput

_FIELDS = ("loss", "recon", "dec_masks", "sa_masks", "sa_logits", "slots")


def stack_key(cfg: SPOTConfig) -> str:
    """Equal for two configs exactly when their models compute the same function of their weights."""
    return repr(dataclasses.replace(cfg, optim=OptimConfig()).to_dict())


def forward_each(models: list[SPOT], inputs, target=None, orders=None, noise=None) -> list[SPOTOutput]:
    """The plain path: each model's own forward on the same batch and the same draws."""
    return [m(inputs, target=target, orders=orders, noise=noise) for m in models]


class StackedSPOT:
    """`forward` runs M same-config SPOT models as one vmapped model; output fields gain a leading M."""

    def __init__(self, models: list[SPOT]):
        keys = {stack_key(m.cfg) for m in models}
        if len(keys) != 1:
            raise ValueError("StackedSPOT needs models of one configuration (equal stack_key)")
        self.models = models
        # The template only lends its code: weights on the meta device, buffers taken from model 0.
        # The fused Triton step has no vmap rule, so the stacked model runs the PyTorch reference.
        self.template = copy.deepcopy(models[0]).to("meta")
        sa = self.template.slot_attention
        sa.cfg = dataclasses.replace(sa.cfg, use_kernel=False)
        self.buffers = dict(models[0].named_buffers())

    def stacked_params(self) -> dict[str, torch.Tensor]:
        """name -> (M, ...) stack of the models' parameters (differentiable back to each model)."""
        names = [n for n, _ in self.models[0].named_parameters()]
        per_model = [dict(m.named_parameters()) for m in self.models]
        return {n: torch.stack([p[n] for p in per_model]) for n in names}

    def _one(self, params, inputs, target, orders, noise):
        out = functional_call(self.template, (params, self.buffers), (inputs,),
                              dict(target=target, orders=orders, noise=noise))
        return tuple(getattr(out, f) for f in _FIELDS)

    def forward(self, inputs, target=None, orders=None, noise=None) -> SPOTOutput:
        """inputs/target/noise are shared by all M models; `orders` must not be random (pass the
        drawn order: an int or a tensor). Returns SPOTOutput whose fields are (M, ...)."""
        if orders is None or isinstance(orders, str) and orders in ("random", "per_sample"):
            raise ValueError("draw the order outside the stacked model and pass it (an int or a tensor)")
        if noise is None and self.models[0].cfg.slot_attention.init == "shared_gaussian":
            raise ValueError("draw the shared-Gaussian noise outside the stacked model and pass it")
        fn = vmap(self._one, in_dims=(0, None, None, None, None))
        with warnings.catch_warnings():     # ops without a batching rule (GRUCell, CPU SDPA) loop over M
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
            return SPOTOutput(*fn(self.stacked_params(), inputs, target, orders, noise))

    __call__ = forward

    def unstack(self, out: SPOTOutput) -> list[SPOTOutput]:
        """The stacked output as one SPOTOutput per model."""
        return [SPOTOutput(*(getattr(out, f)[m] for f in _FIELDS)) for m in range(len(self.models))]
