"""SPOT's decoders (spec section 3): the autoregressive transformer with patch-order permutations,
and the DINOSAUR MLP decoder baseline.

Batched multi-permutation decoding: the orders to decode are given per sample as a (B, R) index
tensor and folded into the batch, so decoding R orders is ONE pass over B*R sequences; the
outputs and masks are mapped back to raster order and averaged over the R orders.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from spot_fast.config import DecoderConfig
from spot_fast.layers import linear
from spot_fast.permutations import inverse_orders, patch_orders


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
        B, T, D = x.shape
        L = context.shape[1]
        q = self.q(x).view(B, T, self.heads, -1).transpose(1, 2)         # (B, h, T, dh)
        k = self.k(context).view(B, L, self.heads, -1).transpose(1, 2)   # (B, h, L, dh)
        v = self.v(context).view(B, L, self.heads, -1).transpose(1, 2)   # (B, h, L, dh)
        if need_weights:
            q = q * (q.shape[-1] ** -0.5)
            weights = F.softmax(q @ k.transpose(-1, -2), dim=-1)        # (B, h, T, L)
            out = weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.o(out.transpose(1, 2).reshape(B, T, D)), weights


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
        if self.first:
            x = self.norm_self(x)
            x = x + self.self_attn(x, x, causal=True)[0]
        else:
            h = self.norm_self(x)
            x = x + self.self_attn(h, h, causal=True)[0]
        h, weights = self.cross_attn(self.norm_cross(x), slots, need_weights=need_weights)
        x = x + h
        return x + self.ffn(self.norm_ffn(x)), weights


class ARDecoder(nn.Module):
    """Autoregressive transformer decoder over P patch orders of an h x h grid."""

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
        self.register_buffer("orders", orders, persistent=False)            # (P, N)
        self.register_buffer("inverse", inverse_orders(orders), persistent=False)

    def forward(self, slots: torch.Tensor, target: torch.Tensor, order_ids: torch.Tensor):
        """slots (B, K, S), target (B, N, D), order_ids (B, R) -> recon (B, N, D), masks (B, N, K)."""
        B, N, D = target.shape
        R = order_ids.shape[1]
        perm = self.orders[order_ids]                                        # (B, R, N)
        seq = torch.gather(target.unsqueeze(1).expand(B, R, N, D), 2,
                           perm.unsqueeze(-1).expand(B, R, N, D))            # (B, R, N, D) in order
        bos = self.bos[order_ids].unsqueeze(2)                               # (B, R, 1, D)
        x = torch.cat([bos, seq[:, :, :-1]], dim=2).flatten(0, 1)            # (B*R, N, D) teacher forcing
        x = self.input_norm(self.input_proj(x))
        ctx = self.slot_norm(self.slot_proj(slots))                          # (B, K, D)
        ctx = ctx.unsqueeze(1).expand(B, R, *ctx.shape[1:]).flatten(0, 1)    # (B*R, K, D)
        for i, block in enumerate(self.blocks):
            x, weights = block(x, ctx, need_weights=i == len(self.blocks) - 1)
        x = self.final_norm(x)
        masks = weights.sum(1)                                               # (B*R, N, K) over heads
        masks = masks / masks.sum(-1, keepdim=True)                          # L1 over slots
        inv = self.inverse[order_ids]                                        # (B, R, N)
        recon = _to_raster(x.view(B, R, N, D), inv).mean(1)
        masks = _to_raster(masks.view(B, R, N, -1), inv).mean(1)
        return recon, masks


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

    def forward(self, slots: torch.Tensor, target: torch.Tensor | None = None, order_ids=None):
        """slots (B, K, S) -> recon (B, N, D), masks (B, N, K). Raster order only."""
        z = self.slot_norm(self.slot_proj(slots))                            # (B, K, D)
        out = self.mlp(z.unsqueeze(2) + self.pos_embed)                      # (B, K, N, D+1)
        patches, alpha = out[..., :-1], out[..., -1:].softmax(dim=1)         # alpha over slots
        recon = (patches * alpha).sum(dim=1)                                 # (B, N, D)
        return recon, alpha.squeeze(-1).transpose(1, 2)
