"""The stacked (vmapped) path equals M separate models: forward, gradients and an Adam step.

fp64: equal to ~1e-12. fp32: the stacked path's error against the fp64 run is within twice the
separate fp32 models' own error plus a small floor (the stacked matmuls round differently).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from spot_fast.config import preset
from spot_fast.model import SPOT
from spot_fast.sweep.stacked import StackedSPOT, forward_each, stack_key

M = 3


def _models(cfg, dtype, seeds=range(M)):
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(SPOT(cfg).to(dtype).train())
    return out


def _batch(cfg, dtype, B=5, stage2=False):
    g = torch.Generator().manual_seed(7)
    N, D, K, S = cfg.encoder.num_patches, cfg.feature_dim, cfg.slot_attention.num_slots, cfg.slot_attention.slot_size
    # Confident slots: features with a large scale give large attention logits.
    inputs = 4 * torch.randn(5, (1 if stage2 else 0) + N, D, generator=g, dtype=dtype)
    target = torch.randn(B, N, D, generator=g, dtype=dtype) if stage2 else None
    noise = torch.randn(B, K, S, generator=g, dtype=dtype)
    return inputs, target, noise


def _grads(models):
    return [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in models]


def _run(cfg, dtype, stacked: bool, order=3, adam_steps=0, stage2=False):
    models = _models(cfg, dtype)
    inputs, target, noise = _batch(cfg, dtype, stage2=stage2)
    opts = [torch.optim.Adam(m.parameters(), lr=lr) for m, lr in zip(models, (4e-4, 1e-3, 4e-3))]
    for step in range(adam_steps + 1):
        for o in opts:
            o.zero_grad()
        if stacked:
            s = StackedSPOT(models)
            out = s(inputs, target=target, orders=order, noise=noise)
            out.loss.sum().backward()
            outs = s.unstack(out)
        else:
            outs = forward_each(models, inputs, target=target, orders=order, noise=noise)
            sum(o.loss for o in outs).backward()
        if step < adam_steps:
            for o in opts:
                o.step()
    params = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in models]
    return outs, _grads(models), params


def _check(cfg, **kw):
    ref_outs, ref_grads, ref_params = _run(cfg, torch.float64, stacked=False, **kw)
    got = {dt: _run(cfg, dt, stacked=True, **kw) for dt in (torch.float64, torch.float32)}
    plain32 = _run(cfg, torch.float32, stacked=False, **kw)
    for dt, (outs, grads, params) in got.items():
        for m in range(M):
            pairs = [(outs[m].loss, ref_outs[m].loss, plain32[0][m].loss),
                     (outs[m].recon, ref_outs[m].recon, plain32[0][m].recon),
                     (outs[m].sa_logits, ref_outs[m].sa_logits, plain32[0][m].sa_logits),
                     (outs[m].dec_masks, ref_outs[m].dec_masks, plain32[0][m].dec_masks),
                     (grads[m], ref_grads[m], plain32[1][m]),
                     (params[m], ref_params[m], plain32[2][m])]
            for a, ref, fp32 in pairs:
                scale = ref.abs().max().item() + 1e-30
                err = (a.double() - ref).abs().max().item() / scale
                if dt == torch.float64:
                    assert err < 1e-10, err
                else:
                    own = (fp32.double() - ref).abs().max().item() / scale
                    assert err <= 2 * own + 1e-5, (err, own)


def test_stacked_stage1_equals_separate_models_forward_backward():
    _check(preset("tiny"))


def test_stacked_adam_step_equals_separate_models():
    _check(preset("tiny"), adam_steps=1)       # outputs, gradients and weights after one Adam update


def test_stacked_stage2_student_and_all_orders():
    cfg = preset("tiny", stage=2)
    _check(cfg, stage2=True, order=torch.arange(cfg.decoder.num_orders).expand(5, -1))


def test_stacked_mlp_decoder():
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, kind="mlp", train_orders="standard",
                                                                eval_orders="standard"))
    _check(cfg, order=0)


def test_stack_key_separates_architectures_not_optimisers():
    base = preset("tiny")
    lr = dataclasses.replace(base, optim=dataclasses.replace(base.optim, lr=1e-3, ce_weight=0.1))
    slots = dataclasses.replace(base, slot_attention=dataclasses.replace(base.slot_attention, num_slots=5))
    assert stack_key(base) == stack_key(lr) != stack_key(slots)
    with pytest.raises(ValueError, match="one configuration"):
        StackedSPOT([SPOT(base), SPOT(slots)])


def test_stacked_refuses_random_draws_inside():
    s = StackedSPOT(_models(preset("tiny"), torch.float32, seeds=(0, 1)))
    inputs, _, noise = _batch(preset("tiny"), torch.float32)
    with pytest.raises(ValueError, match="draw the order"):
        s(inputs, noise=noise)
    with pytest.raises(ValueError, match="shared-Gaussian noise"):
        s(inputs, orders=0)
