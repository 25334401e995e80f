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


def _graph_saved_bytes(model: SPOT, batch_size: int) -> int:
    """Bytes autograd holds for the backward, counted another way than the estimate's hook: walk
    the graph of one training forward and add up the distinct storages that its nodes saved
    (`_saved_*` of built-in nodes, `saved_tensors` of custom Functions), parameters excluded."""
    cfg = model.cfg
    out = model(torch.randn(batch_size, cfg.encoder.num_patches, cfg.feature_dim))
    todo = [v.grad_fn for v in vars(out).values() if isinstance(v, torch.Tensor) and v.grad_fn is not None]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, storages = set(), {}
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo += [n for n, _ in node.next_functions]
        saved = [getattr(node, a) for a in dir(node) if a.startswith("_saved_")]
        saved += list(getattr(node, "saved_tensors", ()))
        for t in (t for v in saved for t in (v if isinstance(v, (tuple, list)) else [v])):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def test_profile_counts_parameters_and_extrapolates_activations():
    cfg = _slots(4)
    m = variant_memory(cfg)
    assert m.params == sum(p.numel() for p in SPOT(cfg).parameters())
    assert m.state_bytes == 16 * m.params                      # weights, grads, two Adam moments (fp32)
    measured = _saved_bytes(SPOT(cfg).train(), 7, bf16=False)
    assert abs(m.activations(7) - measured) <= 0.02 * measured
    # the fit (batches 1 and 2) against an independent count at batches it never saw
    for batch in (5, 13):
        measured = _graph_saved_bytes(SPOT(cfg).train(), batch)
        assert abs(m.activations(batch) - measured) <= 0.02 * measured, (batch, m.activations(batch), measured)
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
