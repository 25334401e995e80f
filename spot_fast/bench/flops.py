"""An explicit FLOP count of SPOT's steps, for MFU.

Counted: every matrix multiply, 2 * m * n * k FLOPs (one multiply + one add per term),
including attention's two products (Q K^T and P V: 4 * queries * keys * width per head group,
the causal self-attention counted in full, as dense kernels compute it). Not counted:
LayerNorm, softmax, GRU gates' element-wise maths, the optimiser (all O(tokens * width)).
A training step costs 3x the forward (the backward computes two products per forward product).
A frozen encoder costs its forward only. Checked against torch's FlopCounterMode in
tests/test_bench.py.
"""
from __future__ import annotations

from dataclasses import replace

from spot_fast.config import SPOTConfig

TRAIN_FACTOR = 3    # forward + backward (2x forward)


def linear(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def attention(batch: int, queries: int, keys: int, width: int) -> int:
    """Q K^T and P V over all heads of total width `width`."""
    return 4 * batch * queries * keys * width


def vit_blocks(cfg: SPOTConfig, batch: int, blocks: int, patch_embed: bool = False) -> int:
    """`blocks` pre-LN ViT blocks (MLP ratio of the spec) on B x (prefix + N) tokens."""
    spec = cfg.encoder.spec
    D, T = spec.embed_dim, cfg.encoder.num_patches + 1 + spec.num_registers
    hidden = int(D * spec.mlp_ratio)
    per_block = (linear(batch * T, D, 3 * D) + attention(batch, T, T, D) + linear(batch * T, D, D)
                 + linear(batch * T, D, hidden) + linear(batch * T, hidden, D))
    stem = linear(batch * cfg.encoder.num_patches, 3 * spec.patch_size ** 2, D) if patch_embed else 0
    return blocks * per_block + stem


def encoder(cfg: SPOTConfig, batch: int) -> int:
    """The whole frozen encoder's forward (patch embedding + every block)."""
    return vit_blocks(cfg, batch, cfg.encoder.spec.depth, patch_embed=True)


def slot_attention(cfg: SPOTConfig, batch: int) -> int:
    sa, D, N = cfg.slot_attention, cfg.feature_dim, cfg.encoder.num_patches
    K, S, BN, BK = sa.num_slots, sa.slot_size, batch * N, batch * sa.num_slots
    inputs = 2 * linear(BN, D, D) + 2 * linear(BN, D, S)                    # feature MLP, k, v
    per_iter = (linear(BK, S, S) + attention(batch, N, K, S)                 # q, logits + updates
                + 2 * linear(BK, S, 3 * S) + linear(BK, S, sa.mlp_hidden) + linear(BK, sa.mlp_hidden, S))
    return inputs + sa.num_iterations * per_iter


def ar_decoder(cfg: SPOTConfig, batch: int, orders: int, masks_only: bool = False) -> int:
    """The transformer decoder decoding `orders` orders per sample (the plain path's count;
    the fast path does less: input and slot K/V projections once per sample, not per order).
    `masks_only`: without what follows the last block's cross-attention probabilities (their
    product with V, the output projection, the FFN)."""
    dec, D, N = cfg.decoder, cfg.feature_dim, cfg.encoder.num_patches
    K, S = cfg.slot_attention.num_slots, cfg.slot_attention.slot_size
    BN = batch * N
    per_block = (linear(BN, D, 4 * D) + attention(batch, N, N, D)            # self q, k, v, o
                 + linear(BN, D, 2 * D) + linear(batch * K, D, 2 * D)        # cross q, o; k, v
                 + attention(batch, N, K, D) + linear(BN, D, 4 * D) + linear(BN, 4 * D, D))
    per_order = linear(BN, D, D) + linear(batch * K, S, D) + dec.num_blocks * per_block
    if masks_only:
        per_order -= attention(batch, N, K, D) // 2 + linear(BN, D, D) + linear(BN, D, 4 * D) + linear(BN, 4 * D, D)
    return orders * per_order


def spot_forward(cfg: SPOTConfig, batch: int, orders: int = 1, masks_only: bool = False) -> int:
    """SPOT's forward: the stage-2 tail (if any), slot attention, the decoder."""
    tail = 0
    if cfg.stage == 2:
        tail = vit_blocks(cfg, batch, cfg.encoder.spec.depth - cfg.encoder.split_block)
    return tail + slot_attention(cfg, batch) + ar_decoder(cfg, batch, orders, masks_only)


def bench_steps(cfg: SPOTConfig, batch: int) -> dict[str, dict[str, int]]:
    """FLOPs of one step of every row `spot-fast bench` times (useful work: the batched eval is
    credited with the serial count of what it outputs, the masks, the work it computes once
    instead of per order aside; the stage-2 teacher likewise decodes masks only). The reference
    rows run the encoder inside the step: stage 1 once; stage 2 three times (the teacher's, the
    frozen target's, and the student's, whose first split_block blocks are forward-only and whose
    tail trains); evaluation twice (`use_second_encoder`), on a stage-2 model."""
    enc = encoder(cfg, batch)
    two = replace(cfg, stage=2)
    stage1 = TRAIN_FACTOR * spot_forward(cfg, batch)
    stage2 = TRAIN_FACTOR * spot_forward(two, batch)
    teacher, teacher_masks = spot_forward(cfg, batch), spot_forward(cfg, batch, masks_only=True)
    student_frozen = vit_blocks(cfg, batch, cfg.encoder.split_block, patch_embed=True)
    return {"stage1": {"reference": stage1 + enc, "spot-fast": stage1},
            "stage2": {"reference": stage2 + teacher + 2 * enc + student_frozen, "spot-fast": stage2 + teacher_masks},
            "eval": {"reference": spot_forward(cfg, batch, orders=9) + 2 * enc,
                     "serial": spot_forward(two, batch, orders=9),
                     "batched": spot_forward(two, batch, orders=9, masks_only=True)}}
