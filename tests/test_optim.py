"""spot_fast.train.optim: the inf-norm clip equals torch's bit for bit; fused Adam stays within
fp32 rounding of an fp64 Adam (the house rule for fast paths: <= 2x torch fp32's own error)."""
import math

import pytest
import torch

from spot_fast.train.optim import adam, clip_grad_inf_norm_

SHAPES = [(64, 48), (48,), (7, 32), (1,), (3, 5, 4)]


def params_with_grads(scale: float, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * scale
    ps.append(torch.nn.Parameter(torch.zeros(2)))          # a parameter without a gradient
    return ps


@pytest.mark.parametrize("scale", [1e-3, 0.05, 10.0])   # below, around and far above max_norm 0.3
def test_clip_equals_torch_bit_for_bit(scale):
    ours, ref = params_with_grads(scale), params_with_grads(scale)
    norm = clip_grad_inf_norm_(ours, 0.3)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 0.3, norm_type=math.inf)
    assert torch.equal(norm, ref_norm)
    for a, b in zip(ours, ref):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad)
    assert max(p.grad.abs().max().item() for p in ours if p.grad is not None) <= 0.3 + 1e-6


def test_clip_keeps_nan_visible():
    ps = params_with_grads(1.0)
    ps[0].grad[0, 0] = float("nan")
    assert torch.isnan(clip_grad_inf_norm_(ps, 0.3))


def run_adam(make, dtype, steps: int = 20):
    g = torch.Generator().manual_seed(1)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]
    opt = make(ps)
    for _ in range(steps):
        for p in ps:    # confident-model regime: gradients from tiny to large
            p.grad = (torch.randn(p.shape, generator=g) * 10 ** torch.empty(p.shape).uniform_(-4, 1, generator=g)).to(dtype)
        opt.step()
    return ps


def test_fused_adam_within_twice_torch_fp32_error():
    exact = run_adam(lambda ps: torch.optim.Adam(ps, lr=4e-4), torch.float64)
    plain = run_adam(lambda ps: torch.optim.Adam(ps, lr=4e-4), torch.float32)
    fused = run_adam(lambda ps: adam(ps, lr=4e-4), torch.float32)
    assert all(opt_p.dtype == torch.float32 for opt_p in fused)
    for e, p, f in zip(exact, plain, fused):
        plain_err = (p.double() - e).abs().max().item()
        fused_err = (f.double() - e).abs().max().item()
        assert fused_err <= 2 * plain_err + 1e-7 * e.abs().max().item(), (fused_err, plain_err)
    moved = max((f.double() - run_adam(lambda ps: torch.optim.SGD(ps, lr=0.0), torch.float64)[i]).abs().max().item()
                for i, f in enumerate(fused))
    assert moved > 1e-3                                   # the optimiser did step
