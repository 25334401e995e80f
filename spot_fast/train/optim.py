"""The optimiser step's two parts, fast on a CPU: Adam and infinity-norm gradient clipping.

- `adam`: torch's Adam with its fused kernel (`fused=True`: one pass over param, grad and both
  moments per tensor, multi-threaded), where torch's CPU default is the per-tensor loop of ~10
  separate elementwise passes. Same maths; fp32 rounding of the update differs in the last bits
  (tests/test_optim.py bounds it against an fp64 Adam, as the house rule for fast paths).
- `clip_grad_inf_norm_`: `torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=inf)`
  bit for bit, with the per-tensor norms taken as `abs().amax()` (exact, as any max) instead of
  `linalg.vector_norm(g, inf)`, which is ~7x slower on a CPU.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


def adam(params: Iterable[torch.nn.Parameter], lr: float, betas=(0.9, 0.999)) -> torch.optim.Adam:
    """Adam (no weight decay) with the fused kernel: the trainer's and the bench's optimiser."""
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)


def clip_grad_inf_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients in place so that max |grad| <= max_norm; returns the norm before.

    The plain reference is `torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=inf)`:
    coefficient max_norm / (norm + 1e-6), clamped to 1, multiplied into every gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norms = [g.detach().abs().amax() if g.numel() else g.new_zeros(()) for g in grads]
    total = torch.stack([n.to(grads[0].device) for n in norms]).amax()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.detach().mul_(coef.to(g.device, g.dtype))
    return total
