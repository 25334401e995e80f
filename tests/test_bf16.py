"""bf16 autocast, the fast path's precision on GPUs and (opt-in) on CPUs that multiply bf16
natively: the same step as fp32 to bf16's rounding, and training that follows fp32's course.
Gradients are compared with an fp64 reference; fp32's own error sets the scale of nothing
here (bf16 rounding, ~4e-3 per operation, dominates), so the bounds are bf16-sized."""
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


def test_bf16_step_gradients_match_fp64_to_bf16_rounding():
    model, feats, noise = model_and_batch()
    exact = gradients(copy.deepcopy(model).double(), feats.double(), noise.double())
    half = gradients(model, feats, noise, torch.bfloat16)
    assert set(half) == set(exact)
    flat_e = torch.cat([g.flatten() for g in exact.values()])
    flat_h = torch.cat([half[n].flatten() for n in exact])
    assert torch.nn.functional.cosine_similarity(flat_e, flat_h, dim=0) > 0.99
    floor = 1e-3 * flat_e.norm()            # for gradients zero in exact arithmetic (LN bias before q)
    for name, g in exact.items():
        err = (half[name] - g).norm() / g.norm().clamp_min(floor)
        assert err < 0.25, f"{name}: bf16 gradient off by {err:.3g} (relative L2)"


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
