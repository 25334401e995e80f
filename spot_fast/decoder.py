"""SPOT's decoders (spec section 3): the autoregressive transformer with patch-order permutations,
and the DINOSAUR MLP decoder baseline.

Decoding R orders per sample (a (B, R) index tensor) has two implementations in `ARDecoder`:

- the plain reference (`fast = False`): one order at a time, as the SPOT reference does: gather
  the target in that order, prepend the order's BOS, project + normalise, project the slots,
  run the blocks with separate q/k/v projections; the R outputs are averaged in raster order.
- the fast path (default): the same maths with the work that does not depend on the order done
  once per sample. Input projection + LayerNorm, and the first block's LayerNorm + q/k/v
  projection, are per token, so they run once on the target (B, N, D) and the P BOS tokens, and
  every order's shifted sequence (with its first-block q/k/v) is ONE gather through a
  precomputed index (P, N); the slots' cross-attention K/V are computed once per block and
  shared by the R orders (cross-attention is order-independent per query, so the R orders are
  folded into the query axis, never expanded); self-attention uses one fused QKV matmul over
  the concatenated weights (parameter names unchanged); the orders are decoded in chunks of
  at most `token_budget` tokens so the activations stay cache-sized on a CPU.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from spot_fast.config import DecoderConfig
from spot_fast.layers import linear
from spot_fast.permutations import inverse_orders, patch_orders

# Tokens (sequences x positions) decoded per chunk by the fast path, per device type. On a CPU a
# chunk of ~2k tokens keeps the 4x-wide FFN activations near the L2/L3 caches (COCO shapes, batch
# 8, 1 thread: one order per chunk 1.06x serial, all 9 orders in one chunk 0.95x); a GPU wants them all.
TOKEN_BUDGET = {"cpu": 2048, "cuda": 1 << 18}


class Attention(nn.Module):
    """Multi-head attention without biases; optionally returns its probabilities."""

    def __init__(self, dim: int, heads: int, gain: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"decoder width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = linear(dim, dim, bias=False)
        self.k = linear(dim, dim, bias=False)
        self.v = linear(dim, dim, bias=False)
        self.o = linear(dim, dim, bias=False, gain=gain)

    def forward(self, x, context, causal: bool = False, need_weights: bool = False):
        """Plain reference: x (B, T, D) attends to context (B, L, D) with separate projections."""
        B, T, D = x.shape
        L = context.shape[1]
        q = self.q(x).view(B, T, self.heads, -1).transpose(1, 2)         # (B, h, T, dh)
        k = self.k(context).view(B, L, self.heads, -1).transpose(1, 2)   # (B, h, L, dh)
        v = self.v(context).view(B, L, self.heads, -1).transpose(1, 2)   # (B, h, L, dh)
        return self._attend(q, k, v, causal, need_weights)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """q, k and v of x (..., D) side by side (..., 3D): one matmul."""
        return F.linear(x, torch.cat([self.q.weight, self.k.weight, self.v.weight]))

    def causal_self(self, x: torch.Tensor) -> torch.Tensor:
        """Fast causal self-attention of x (B, T, D)."""
        return self.causal_self_qkv(self.qkv(x))

    def causal_self_qkv(self, qkv: torch.Tensor) -> torch.Tensor:
        """Causal self-attention given its q, k, v (B, T, 3D) from `qkv`."""
        B, T, _ = qkv.shape
        q, k, v = qkv.view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, dh)
        return self._attend(q, k, v, causal=True)[0]

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V (B, h, L, dh) of context (B, L, D), for `cross` (one matmul)."""
        B, L, D = context.shape
        w = torch.cat([self.k.weight, self.v.weight])                     # (2D, D)
        k, v = F.linear(context, w).view(B, L, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return k, v

    def cross(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_weights: bool = False):
        """Fast cross-attention of x (B, M, D) to precomputed K/V (B, h, L, dh). M may fold
        several orders' queries of one sample: non-causal attention treats queries independently."""
        B, M, D = x.shape
        q = self.q(x).view(B, M, self.heads, -1).transpose(1, 2)          # (B, h, M, dh)
        return self._attend(q, k, v, False, need_weights)

    def cross_weights(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Only the probabilities (B, h, M, L) of `cross` (the decoder masks), not its output."""
        B, M, D = x.shape
        return _probs(self.q(x).view(B, M, self.heads, -1).transpose(1, 2), k)

    def _attend(self, q, k, v, causal: bool, need_weights: bool = False):
        B, h, T, dh = q.shape
        if need_weights:
            weights = _probs(q, k)                                        # (B, h, T, L)
            out = weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.o(out.transpose(1, 2).reshape(B, T, h * dh)), weights


def _probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Non-causal attention probabilities softmax(q k^T / sqrt(dh)), (B, h, T, L)."""
    return F.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), dim=-1)


class DecoderBlock(nn.Module):
    """Pre-LN block: causal self-attention, cross-attention to the slots, ReLU FFN. In the first
    block the LayerNorm output replaces the residual stream (the reference's quirk)."""

    def __init__(self, dim: int, heads: int, cross_heads: int, gain: float, first: bool):
        super().__init__()
        self.first = first
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, gain)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, cross_heads, gain)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(linear(dim, 4 * dim, init="kaiming"), nn.ReLU(),
                                 linear(4 * dim, dim, gain=gain))

    def forward(self, x, slots, need_weights: bool = False):
        """Plain reference: x (B, N, D) one order per sequence, slots (B, K, D)."""
        if self.first:
            x = self.norm_self(x)
            x = x + self.self_attn(x, x, causal=True)[0]
        else:
            h = self.norm_self(x)
            x = x + self.self_attn(h, h, causal=True)[0]
        h, weights = self.cross_attn(self.norm_cross(x), slots, need_weights=need_weights)
        x = x + h
        return x + self.ffn(self.norm_ffn(x)), weights

    def token_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """First block: its per-token work on inputs x (..., D), the same in every order: the
        LayerNorm output (which replaces the residual stream) and its q, k, v (..., 3D)."""
        h = self.norm_self(x)
        return h, self.self_attn.qkv(h)

    def forward_fast(self, x, kv, qkv=None, need_weights: bool = False, weights_only: bool = False):
        """Fast path: x (B, R, N, D) holds R orders per sample; kv: this block's slot K/V. The
        first block takes x and qkv (B, R, N, 3D) already through `token_rows`. `weights_only`
        stops at the cross-attention probabilities: (None, weights), for masks without a
        reconstruction (the rest of the block does not change them)."""
        B, R, N, D = x.shape
        seqs = x.view(B * R, N, D)                                        # one sequence per order
        if self.first:
            seqs = seqs + self.self_attn.causal_self_qkv(qkv.view(B * R, N, 3 * D))
        else:
            seqs = seqs + self.self_attn.causal_self(self.norm_self(seqs))
        x = seqs.view(B, R * N, D)                                        # the orders share the slots
        if weights_only:
            return None, self.cross_attn.cross_weights(self.norm_cross(x), kv[0])
        h, weights = self.cross_attn.cross(self.norm_cross(x), *kv, need_weights=need_weights)
        x = x + h
        x = x + self.ffn(self.norm_ffn(x))
        return x.view(B, R, N, D), weights


class ARDecoder(nn.Module):
    """Autoregressive transformer decoder over P patch orders of an h x h grid.

    `fast` (default True) selects the shared-work decoding, False the plain one-order-at-a-time
    reference; `token_budget` (None: TOKEN_BUDGET of the device) caps the fast path's chunks."""

    def __init__(self, cfg: DecoderConfig, dim: int, slot_size: int, grid: int):
        super().__init__()
        gain = (3 * cfg.num_blocks) ** -0.5
        self.input_proj = linear(dim, dim, bias=False)
        self.input_norm = nn.LayerNorm(dim)
        self.slot_proj = linear(slot_size, dim, bias=False)
        self.slot_norm = nn.LayerNorm(dim)
        self.bos = nn.Parameter(torch.randn(cfg.num_orders, dim) * 0.02)   # one BOS per order
        self.blocks = nn.ModuleList(
            DecoderBlock(dim, cfg.num_heads, cfg.num_heads if i == 0 else cfg.cross_heads, gain, first=i == 0)
            for i in range(cfg.num_blocks))
        self.final_norm = nn.LayerNorm(dim)
        orders = patch_orders(grid)[: cfg.num_orders]
        N = orders.shape[1]
        # Teacher-forcing input of order p, as an index into [target (N rows); BOS (P rows)]:
        # position 0 is BOS_p (row N + p), position i is the patch decoded at i - 1.
        shifted = torch.cat([N + torch.arange(len(orders)).unsqueeze(1), orders[:, :-1]], dim=1)
        self.register_buffer("orders", orders, persistent=False)            # (P, N)
        self.register_buffer("inverse", inverse_orders(orders), persistent=False)
        self.register_buffer("shifted", shifted, persistent=False)          # (P, N)
        self.fast = True
        self.token_budget: int | None = None

    def forward(self, slots: torch.Tensor, target: torch.Tensor, order_ids: torch.Tensor,
                recon: bool = True):
        """slots (B, K, S), target (B, N, D), order_ids (B, R) -> recon (B, N, D), masks (B, N, K),
        both in raster order and averaged over the R orders. `recon=False` (fast path): masks
        only, recon None; decoding stops at the last block's cross-attention probabilities,
        skipping its output projection and FFN and the final LayerNorm (~16% of the FLOPs)."""
        if not self.fast:
            return self.forward_serial(slots, target, order_ids)
        B, N, D = target.shape
        R = order_ids.shape[1]
        ctx = self.slot_norm(self.slot_proj(slots))                          # (B, K, D)
        kvs = [block.cross_attn.context_kv(ctx) for block in self.blocks]
        first = self.blocks[0]
        bos = first.token_rows(self.input_norm(self.input_proj(self.bos)))     # (P, D), (P, 3D)
        tokens = first.token_rows(self.input_norm(self.input_proj(target)))    # (B, N, D), (B, N, 3D)
        tables = [torch.cat([t, b.unsqueeze(0).expand(B, -1, -1)], dim=1)     # (B, N+P, D | 3D)
                  for t, b in zip(tokens, bos)]
        step = self.orders_per_chunk(B * N, target.device)
        total, masks = 0, 0
        for r in range(0, R, step):
            ids = order_ids[:, r:r + step]                                   # (B, c)
            c_recon, c_masks = self._decode_chunk(tables, kvs, ids, recon)
            total, masks = (total + c_recon if recon else None), masks + c_masks
        return (total / R if recon else None), masks / R

    def orders_per_chunk(self, tokens_per_order: int, device: torch.device) -> int:
        budget = self.token_budget or TOKEN_BUDGET.get(device.type, TOKEN_BUDGET["cuda"])
        return max(1, budget // tokens_per_order)

    def _decode_chunk(self, tables, kvs, ids, recon: bool = True):
        """Orders ids (B, c) of every sample -> their recon (B, N, D) (None unless `recon`) and
        masks (B, N, K) summed over the c orders, in raster order. tables: the first block's
        token rows (B, N+P, D) and their q, k, v (B, N+P, 3D), gathered into each order's
        shifted sequence."""
        B, c = ids.shape
        N = self.orders.shape[1]
        idx = self.shifted[ids].view(B, c * N, 1)
        x, qkv = (torch.gather(t, 1, idx.expand(-1, -1, t.shape[-1])).view(B, c, N, -1)
                  for t in tables)                                           # (B, c, N, D | 3D) shifted
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x, weights = block.forward_fast(x, kvs[i], qkv if i == 0 else None, need_weights=i == last,
                                            weights_only=i == last and not recon)
        masks = weights.sum(1)                                               # (B, c*N, K) over heads
        masks = masks / masks.sum(-1, keepdim=True)                          # L1 over slots
        inv = self.inverse[ids]                                              # (B, c, N)
        masks = _to_raster(masks.view(B, c, N, -1), inv).sum(1)
        if not recon:
            return None, masks
        return _to_raster(self.final_norm(x), inv).sum(1), masks

    def forward_serial(self, slots, target, order_ids):
        """The plain reference: each of the R orders decoded on its own, then averaged."""
        outs = [self._decode_one(slots, target, order_ids[:, r]) for r in range(order_ids.shape[1])]
        recon, masks = zip(*outs)
        return torch.stack(recon).mean(0), torch.stack(masks).mean(0)

    def _decode_one(self, slots, target, ids):
        """One order per sample, ids (B,) -> recon (B, N, D), masks (B, N, K) in raster order."""
        B, N, D = target.shape
        perm = self.orders[ids]                                              # (B, N)
        seq = torch.gather(target, 1, perm.unsqueeze(-1).expand(B, N, D))    # (B, N, D) in order
        x = torch.cat([self.bos[ids].unsqueeze(1), seq[:, :-1]], dim=1)      # teacher forcing
        x = self.input_norm(self.input_proj(x))
        ctx = self.slot_norm(self.slot_proj(slots))                          # (B, K, D)
        for i, block in enumerate(self.blocks):
            x, weights = block(x, ctx, need_weights=i == len(self.blocks) - 1)
        x = self.final_norm(x)
        masks = weights.sum(1)                                               # (B, N, K) over heads
        masks = masks / masks.sum(-1, keepdim=True)                          # L1 over slots
        inv = self.inverse[ids].unsqueeze(1)                                 # (B, 1, N)
        return _to_raster(x.unsqueeze(1), inv)[:, 0], _to_raster(masks.unsqueeze(1), inv)[:, 0]


def _to_raster(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x (B, R, N, C) in decoding order -> raster order, given inverse orders (B, R, N)."""
    return torch.gather(x, 2, inverse.unsqueeze(-1).expand(*inverse.shape, x.shape[-1]))


class MLPDecoder(nn.Module):
    """DINOSAUR's MLP decoder: every slot + a learned position embedding -> (D features, alpha)."""

    def __init__(self, cfg: DecoderConfig, dim: int, slot_size: int, grid: int, layers: int = 3):
        super().__init__()
        self.slot_proj = linear(slot_size, dim, bias=False)
        self.slot_norm = nn.LayerNorm(dim)
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid, dim) * 0.02)
        widths = [dim] + [cfg.mlp_hidden] * layers
        mods: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            mods += [nn.Linear(a, b), nn.ReLU()]
        mods.append(nn.Linear(widths[-1], dim + 1))
        for m in mods:
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        self.mlp = nn.Sequential(*mods)

    def forward(self, slots: torch.Tensor, target: torch.Tensor | None = None, order_ids=None,
                recon: bool = True):
        """slots (B, K, S) -> recon (B, N, D), masks (B, N, K). Raster order only. The masks
        need the whole MLP, so `recon=False` saves only the weighted sum."""
        z = self.slot_norm(self.slot_proj(slots))                            # (B, K, D)
        out = self.mlp(z.unsqueeze(2) + self.pos_embed)                      # (B, K, N, D+1)
        patches, alpha = out[..., :-1], out[..., -1:].softmax(dim=1)         # alpha over slots
        masks = alpha.squeeze(-1).transpose(1, 2)
        return ((patches * alpha).sum(dim=1) if recon else None), masks      # (B, N, D), (B, N, K)
