"""Slot Attention encoder (spec section 2): feature MLP, slot init, T iterations with truncation.

The attention step of each iteration is `spot_fast.kernels.attention_step.slot_attention_step`:
the plain PyTorch reference, or the fused Triton kernel on CUDA when `use_kernel` is set (opt-in).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from spot_fast.config import SlotAttentionConfig
from spot_fast.kernels.attention_step import slot_attention_step
from spot_fast.layers import gru_cell, linear, mlp


@dataclass
class SlotAttentionOutput:
    slots: torch.Tensor    # (B, K, S) after the last iteration
    attn: torch.Tensor     # (B, N, K) last iteration's attention, summed over heads
    logits: torch.Tensor   # (B, H, N, K) last iteration's attention logits
    init: torch.Tensor     # (B, K, S) initial slots


class SlotAttention(nn.Module):
    def __init__(self, cfg: SlotAttentionConfig, input_dim: int):
        super().__init__()
        self.cfg = cfg
        K, S = cfg.num_slots, cfg.slot_size
        self.feature_norm = nn.LayerNorm(input_dim)
        self.feature_mlp = mlp(input_dim, input_dim)
        if cfg.init == "shared_gaussian":
            self.init_mu = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, 1, S)))
            self.init_log_sigma = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, 1, S)))
        else:
            self.init_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(K, S)))
        self.norm_inputs = nn.LayerNorm(input_dim)
        self.to_q = linear(S, S, bias=False)
        self.to_k = linear(input_dim, S, bias=False)
        self.to_v = linear(input_dim, S, bias=False)
        self.norm_slots = nn.LayerNorm(S)
        self.gru = gru_cell(S)
        self.norm_mlp = nn.LayerNorm(S)
        self.slot_mlp = mlp(S, cfg.mlp_hidden)

    def initial_slots(self, batch: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, S). `noise` (B, K, S) ~ N(0, 1) makes the shared-Gaussian init reproducible."""
        K, S = self.cfg.num_slots, self.cfg.slot_size
        if self.cfg.init == "embedding":
            return self.init_embedding.expand(batch, -1, -1).contiguous()
        if noise is None:
            noise = torch.randn(batch, K, S, dtype=self.init_mu.dtype, device=self.init_mu.device)
        return self.init_mu + torch.exp(self.init_log_sigma) * noise

    def forward(self, features: torch.Tensor, noise: torch.Tensor | None = None) -> SlotAttentionOutput:
        """features: (B, N, D) -> slots and the last iteration's attention."""
        B, N, _ = features.shape
        H, S = self.cfg.num_heads, self.cfg.slot_size
        x = self.feature_mlp(self.feature_norm(features))
        init = self.initial_slots(B, noise)
        x = self.norm_inputs(x)
        k = self.to_k(x).view(B, N, H, -1).transpose(1, 2)       # (B, H, N, d)
        v = self.to_v(x).view(B, N, H, -1).transpose(1, 2)       # (B, H, N, d)
        k = ((S // H) ** -0.5) * k
        slots = init
        for t in range(self.cfg.num_iterations):
            last = t == self.cfg.num_iterations - 1
            if last and self.cfg.truncate == "bi-level":
                slots = slots.detach() + init - init.detach()
            elif last and self.cfg.truncate == "fixed-point":
                slots = slots.detach()
            slots, attn, logits = self._iterate(slots, k, v, last)
        return SlotAttentionOutput(slots, attn, logits, init)

    def _iterate(self, slots, k, v, last: bool):
        B, K, S = slots.shape
        H = self.cfg.num_heads
        q = self.to_q(self.norm_slots(slots)).view(B, K, H, -1).transpose(1, 2)   # (B, H, K, d)
        updates, attn, logits = slot_attention_step(k, q, v, return_attn=last,
                                                    use_kernel=self.cfg.use_kernel)
        updates = updates.transpose(1, 2).reshape(B, K, S)                        # heads concatenated
        slots = self.gru(updates.reshape(-1, S), slots.reshape(-1, S)).view(B, K, S)
        slots = slots + self.slot_mlp(self.norm_mlp(slots))
        return slots, attn, logits
