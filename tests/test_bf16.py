"""bf16 autocast, the fast path's precision on GPUs and (opt-in) on CPUs that multiply bf16
natively: the same step as fp32 to bf16's rounding, and training that follows fp32's course.

Gradients follow flash-attention's rule: the error of the autocast step's gradients against an
fp64 reference is at most twice the error of PyTorch's plain bf16 (the same model and inputs cast
to bf16 whole) against that reference, plus a small floor, for every parameter. bf16 rounding
(~4e-3 per operation) compounds to a few per cent per gradient through 3 slot-attention
iterations and the decoder, so it is PyTorch's own bf16 error that sets the scale, not a guess.
"""
import copy

import torch

from spot_fast.config import preset
from spot_fast.model import SPOT
from spot_fast.train.optim import adam
from spot_fast.train.steps import stage1_forward_backward


def model_and_batch(seed=0, B=6):
    torch.manual_seed(seed)
    model = SPOT(preset("demo"))
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed + 1)
    feats = torch.randn(B, cfg.grid_size ** 2, cfg.feature_dim, generator=g)
    noise = torch.randn(B, cfg.slot_attention.num_slots, cfg.slot_attention.slot_size, generator=g)
    return model, feats, noise


def gradients(model, feats, noise, dtype=None) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    stage1_forward_backward(model, {"features": feats}, noise=noise, orders=3, autocast_dtype=dtype)
    return {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


def test_bf16_step_gradients_within_twice_pytorch_bf16_error():
    model, feats, noise = model_and_batch()
    exact = gradients(copy.deepcopy(model).double(), feats.double(), noise.double())
    half = gradients(copy.deepcopy(model), feats, noise, torch.bfloat16)
    plain = gradients(copy.deepcopy(model).to(torch.bfloat16), feats.bfloat16(), noise.bfloat16())
    assert set(half) == set(exact) == set(plain)
    flat = torch.cat([g.flatten() for g in exact.values()])
    rms = flat.norm() / flat.numel() ** 0.5
    for name, g in exact.items():
        # floor: 0.1% of the gradient, plus 1e-4 of the typical entry for gradients that are zero
        # in exact arithmetic (the LayerNorm bias before q, whose every rounding error is all there is)
        floor = 1e-3 * g.norm() + 1e-4 * rms * g.numel() ** 0.5
        err, err_pt = (half[name] - g).norm(), (plain[name] - g).norm()
        assert err <= 2 * err_pt + floor, (f"{name}: autocast gradient off by {err / g.norm():.3g} (relative L2), "
                                           f"PyTorch bf16 by {err_pt / g.norm():.3g}")
    # and bf16 is not so coarse that the rule says nothing: PyTorch's own error stays a few per cent
    assert (torch.cat([plain[n].flatten() for n in exact]) - flat).norm() < 0.1 * flat.norm()


def test_bf16_training_follows_fp32():
    """40 Adam steps on one batch of the demo model: bf16 autocast and fp32 fall alike."""
    model, feats, noise = model_and_batch(seed=3, B=8)
    losses = {}
    for dtype in (None, torch.bfloat16):
        m = copy.deepcopy(model)
        opt = adam(list(m.parameters()), lr=3e-3)
        curve = []
        for step in range(40):
            out = stage1_forward_backward(m, {"features": feats}, noise=noise, orders=step % 9, autocast_dtype=dtype)
            opt.step()
            opt.zero_grad(set_to_none=True)
            curve.append(out["loss"].item())
        losses[dtype] = curve
    fp32, bf16 = losses[None], losses[torch.bfloat16]
    assert fp32[-1] < 0.8 * fp32[0]                      # it learns (2.0 -> 1.35 here)
    assert abs(bf16[0] - fp32[0]) < 0.01 * fp32[0]       # the same first step
    assert max(abs(a - b) for a, b in zip(bf16, fp32)) < 0.03 * fp32[0]    # and the same course
