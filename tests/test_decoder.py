"""The fast decoder path (shared projections, slot K/V once per sample, fused QKV, chunked
orders) against the plain one-order-at-a-time reference (`ARDecoder.fast = False`).

fp64: equal to round-off. fp32: the fast path's error against the fp64 reference is at most
twice the plain fp32 path's own error plus a small floor (scale-aware: errors are relative to
the output's magnitude), in the confident-slot regime (large cross-attention logits)."""
import copy

import pytest
import torch

from spot_fast.config import DecoderConfig
from spot_fast.decoder import ARDecoder

D, S, GRID, K = 32, 16, 4, 5
N = GRID * GRID


def make_decoder(cross_heads=None, sharpen=1.0) -> ARDecoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(num_blocks=3, num_heads=4, num_cross_heads=cross_heads)
    dec = ARDecoder(cfg, D, S, GRID)
    with torch.no_grad():                      # sharpen: large logits = confident slots
        for block in dec.blocks:
            block.cross_attn.q.weight.mul_(sharpen)
        dec.bos.normal_()
    return dec


def inputs(B, R, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    slots = torch.randn(B, K, S, generator=g, dtype=dtype)
    target = torch.randn(B, N, D, generator=g, dtype=dtype)
    ids = torch.randint(9, (B, R), generator=g)          # per-sample orders, repeats allowed
    return slots, target, ids


def run(dec, fast, slots, target, ids, budget=None):
    dec.fast, dec.token_budget = fast, budget
    return dec(slots, target, ids)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# budgets: one order per chunk, two, four (9 orders -> chunks 4+4+1), all orders in one chunk
BUDGETS = [1, 2 * 3 * N, 4 * 3 * N, None]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("cross_heads", [None, 1])
def test_fast_equals_serial_fp64(budget, cross_heads):
    dec = make_decoder(cross_heads, sharpen=6.0).double().eval()
    slots, target, ids = inputs(3, 9, torch.float64)
    with torch.no_grad():
        ref = run(dec, False, slots, target, ids)
        out = run(dec, True, slots, target, ids, budget)
    for name, a, b in zip(("recon", "masks"), out, ref):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < 1e-12, f"{name}: relative error {rel_err(a, b):.3g}"
    assert torch.allclose(out[1].sum(-1), torch.ones(3, N, dtype=torch.float64))


def test_all_nine_orders_in_order_equal_serial_fp64():
    """The evaluation case: every sample decodes orders 0..8; an odd batch of 5."""
    dec = make_decoder(sharpen=6.0).double().eval()
    slots, target, _ = inputs(5, 9, torch.float64)
    ids = torch.arange(9).expand(5, 9)
    with torch.no_grad():
        ref = run(dec, False, slots, target, ids)
        for budget in (N, 7 * N, None):
            out = run(dec, True, slots, target, ids, budget)
            assert max(rel_err(a, b) for a, b in zip(out, ref)) < 1e-12


@pytest.mark.parametrize("R", [1, 3])
def test_fast_gradients_equal_serial_fp64(R):
    """Training: every parameter's gradient, the slots' and the target's, in fp64."""
    dec = make_decoder(cross_heads=2, sharpen=4.0).double().train()
    twin = copy.deepcopy(dec)
    slots, target, ids = inputs(4, R, torch.float64, seed=3)
    grads = []
    for model, fast in ((dec, True), (twin, False)):
        s, t = slots.clone().requires_grad_(), target.clone().requires_grad_()
        recon, masks = run(model, fast, s, t, ids, budget=2 * N)
        ((recon - t.detach()) ** 2).mean().add((masks ** 2).sum()).backward()
        grads.append({"slots": s.grad, "target": t.grad,
                      **{n: p.grad for n, p in model.named_parameters()}})
    fast_g, ref_g = grads
    assert set(fast_g) == set(ref_g)
    for name in ref_g:
        if ref_g[name] is None:            # BOS rows of orders not drawn get a zero/None grad
            assert fast_g[name] is None or not fast_g[name].any(), name
            continue
        assert rel_err(fast_g[name], ref_g[name]) < 1e-10, f"grad {name}: {rel_err(fast_g[name], ref_g[name]):.3g}"


@pytest.mark.parametrize("budget", [N, None])
def test_fast_fp32_error_within_twice_plain_fp32(budget):
    dec64 = make_decoder(sharpen=8.0).double().eval()
    dec32 = copy.deepcopy(dec64).float()
    slots, target, ids = inputs(6, 9, torch.float64, seed=5)
    with torch.no_grad():
        exact = run(dec64, False, slots, target, ids)
        plain = run(dec32, False, slots.float(), target.float(), ids)
        fast = run(dec32, True, slots.float(), target.float(), ids, budget)
    for name, e, p, f in zip(("recon", "masks"), exact, plain, fast):
        err_fast, err_plain = rel_err(f, e), rel_err(p, e)
        assert err_fast <= 2 * err_plain + 1e-6, f"{name}: fast {err_fast:.3g} vs plain fp32 {err_plain:.3g}"


def test_parameter_names_are_the_reference_layout():
    """The fast path adds no parameters: the state dict is the plain decoder's."""
    dec = make_decoder()
    names = {n for n, _ in dec.named_parameters()}
    assert not any("qkv" in n for n in names)
    assert {"blocks.0.self_attn.q.weight", "blocks.0.self_attn.k.weight",
            "blocks.0.self_attn.v.weight", "blocks.0.cross_attn.o.weight", "bos"} <= names


def test_chunk_sizes_follow_the_token_budget():
    dec = make_decoder()
    cpu = torch.device("cpu")
    dec.token_budget = 10 * N
    assert dec.orders_per_chunk(N, cpu) == 10
    assert dec.orders_per_chunk(20 * N, cpu) == 1        # never zero orders
    dec.token_budget = None
    assert dec.orders_per_chunk(8 * 196, cpu) >= 1


def test_first_block_projections_run_once_per_token():
    """The fast path projects the target (input projection and the first block's q, k, v) once
    per sample, not once per order: R orders save (R - 1) x those matmuls against the reference
    (counted by torch's FlopCounterMode, independent of our code), at the cost of the P BOS rows."""
    from torch.utils.flop_counter import FlopCounterMode
    dec = make_decoder()
    B, R, P = 3, 9, dec.bos.shape[0]
    slots, target, ids = inputs(B, R, torch.float32)
    flops = {}
    for fast in (False, True):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            run(dec, fast, slots, target, ids, budget=1)
        flops[fast] = counter.get_total_flops()
    per_token = 2 * (D * D + D * 3 * D)                 # input projection + first-block q, k, v
    assert flops[False] - flops[True] >= (R - 1) * B * N * per_token - P * per_token


@pytest.mark.parametrize("budget", [N, 4 * N, None])
def test_masks_only_equal_the_serial_masks_fp64(budget):
    """Evaluation's masks-only decoding (stops at the last cross-attention) gives the masks of
    the plain reference's full decoding, and no reconstruction."""
    dec = make_decoder(cross_heads=2, sharpen=6.0).double().eval()
    slots, target, ids = inputs(5, 9, torch.float64, seed=7)
    with torch.no_grad():
        _, ref_masks = run(dec, False, slots, target, ids)
        dec.fast, dec.token_budget = True, budget
        recon, masks = dec(slots, target, ids, recon=False)
    assert recon is None
    assert rel_err(masks, ref_masks) < 1e-12


def test_masks_only_skips_the_last_block_output_and_ffn():
    """Counted by torch's FlopCounterMode: masks-only decoding saves at least the last block's
    cross-attention output projection and FFN (2 x (D^2 + 8 D^2) FLOPs per decoded token)."""
    from torch.utils.flop_counter import FlopCounterMode
    dec = make_decoder()
    B, R = 3, 9
    slots, target, ids = inputs(B, R, torch.float32)
    flops = {}
    for recon in (True, False):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            dec(slots, target, ids, recon=recon)
        flops[recon] = counter.get_total_flops()
    assert flops[True] - flops[False] >= B * R * N * 2 * 9 * D * D


def test_spot_masks_only_matches_full_forward():
    """SPOT.forward(masks_only=True), as evaluation and the stage-2 teacher call it: the same
    decoder and slot-attention masks as the full forward of the same slots; loss and recon None."""
    from spot_fast.config import preset
    from spot_fast.model import SPOT
    torch.manual_seed(0)
    model = SPOT(preset("tiny")).double().eval()
    feats = torch.randn(3, model.cfg.grid_size ** 2, model.cfg.feature_dim, dtype=torch.float64)
    noise = torch.randn(3, model.cfg.slot_attention.num_slots, model.cfg.slot_attention.slot_size,
                        dtype=torch.float64)
    with torch.no_grad():
        full = model(feats, orders="all", noise=noise)
        only = model(feats, orders="all", noise=noise, masks_only=True)
    assert only.loss is None and only.recon is None
    assert rel_err(only.dec_masks, full.dec_masks) < 1e-12
    assert torch.equal(only.sa_masks, full.sa_masks)
