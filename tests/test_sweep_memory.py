"""Memory estimate of a sweep: affine activations, stacked groups cost more, a refusal with the count that fits."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from spot_fast.config import preset
from spot_fast.model import SPOT
from spot_fast.sweep.memory import HEADROOM, _saved_bytes, check_fits, sweep_bytes, variant_memory


def _slots(k):
    cfg = preset("tiny")
    return dataclasses.replace(cfg, slot_attention=dataclasses.replace(cfg.slot_attention, num_slots=k))


def test_profile_counts_parameters_and_extrapolates_activations():
    cfg = _slots(4)
    m = variant_memory(cfg)
    assert m.params == sum(p.numel() for p in SPOT(cfg).parameters())
    assert m.state_bytes == 16 * m.params                      # weights, grads, two Adam moments (fp32)
    measured = _saved_bytes(SPOT(cfg).train(), 7, bf16=False)
    assert abs(m.activations(7) - measured) <= 0.02 * measured
    # more slots save more activations per sample; the parameters do not change (shared Gaussian init)
    assert variant_memory(_slots(6)).act_per_sample > m.act_per_sample and variant_memory(_slots(6)).params == m.params


def test_sequential_peak_is_states_plus_the_largest_activations():
    cfgs = [_slots(k) for k in (3, 4, 5, 6)]
    seq = sweep_bytes([[c] for c in cfgs], 16)
    profiles = [variant_memory(c) for c in cfgs]
    assert seq > sum(p.state_bytes for p in profiles) + profiles[-1].activations(16)
    assert seq < sum(p.state_bytes for p in profiles) + sum(p.activations(16) for p in profiles)
    same = [_slots(4)] * 4
    assert sweep_bytes([same], 16, stacked=True) > sweep_bytes([[c] for c in same], 16)


def test_refuses_with_the_number_that_fits():
    cfgs = [[_slots(k)] for k in (3, 4, 5, 6)]
    two = sweep_bytes(cfgs[:2], 64) * HEADROOM
    assert check_fits(cfgs, 64, torch.device("cpu"), free=10 * two) == sweep_bytes(cfgs, 64)
    with pytest.raises(MemoryError, match=r"for 4 variants at batch 64 \(fp32\) but cpu has .* GiB free: "
                                          r"2 of these variants would fit"):
        check_fits(cfgs, 64, torch.device("cpu"), free=int(two) + 1)
    with pytest.raises(MemoryError, match="0 of these variants would fit"):
        check_fits(cfgs, 64, torch.device("cpu"), free=1000)


def test_each_distinct_stage2_teacher_counts_once():
    student, teacher = preset("tiny", stage=2), preset("tiny")
    shared = sweep_bytes([[student], [student]], 8, teachers=(teacher,))
    own = sweep_bytes([[student], [student]], 8, teachers=(teacher, teacher))
    assert own - shared == 4 * variant_memory(teacher).params
    assert shared - sweep_bytes([[student], [student]], 8) == 4 * variant_memory(teacher).params
