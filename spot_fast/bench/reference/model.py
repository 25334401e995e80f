"""SPOT as the reference code computes it, op for op, written from reading its `spot.py`,
`slot_attn.py` and `transformer.py` (not copied): the cost of the reference, not spot-fast's.

- the encoder runs inside the model (`forward_encoder`: DINO's `prepare_tokens` + every block, CLS
  dropped); with a second encoder the decoder's target is a second forward through it;
- slot attention: per-iteration explicit products, softmax over heads x slots, GRU and MLP;
- the decoder: one patch order at a time (train: one random order per batch; eval: the configured
  ones), each order re-gathering the target, re-projecting the input AND the slots, and running
  every block: multi-head attention with separate q/k/v projections, an explicit `q @ k^T`,
  `masked_fill(-inf)` with the causal mask, softmax, dropout, `@ v`;
- the last block's cross-attention probabilities (the reference reads them with a forward
  pre-hook on `attn_dropout`) are returned by `MultiHeadAttention.forward`: the same tensor,
  no extra work.
Parameter names are the reference's, so `spot_fast.checkpoint.reference_name` maps a spot-fast
SPOT's weights onto this model (tests/test_bench_reference.py holds the two equal).
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

from spot_fast.layers import gru_cell, linear
from spot_fast.permutations import patch_orders


def mlp(width: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(linear(width, hidden, init="kaiming"), nn.ReLU(), linear(hidden, width))


class SlotAttention(nn.Module):
    def __init__(self, iters: int, input_size: int, slot_size: int, mlp_size: int, truncate: str,
                 heads: int = 1, epsilon: float = 1e-8):
        super().__init__()
        self.num_iter, self.slot_size, self.truncate, self.num_heads = iters, slot_size, truncate, heads
        self.epsilon = epsilon
        self.norm_inputs, self.norm_slots = nn.LayerNorm(input_size), nn.LayerNorm(slot_size)
        self.norm_mlp = nn.LayerNorm(slot_size)
        self.project_q = linear(slot_size, slot_size, bias=False)
        self.project_k = linear(input_size, slot_size, bias=False)
        self.project_v = linear(input_size, slot_size, bias=False)
        self.gru = gru_cell(slot_size)
        self.mlp = nn.Sequential(linear(slot_size, mlp_size, init="kaiming"), nn.ReLU(), linear(mlp_size, slot_size))

    def forward(self, inputs: torch.Tensor, slots_init: torch.Tensor):
        B, N, _ = inputs.shape
        K, H = slots_init.shape[1], self.num_heads
        slots = slots_init
        inputs = self.norm_inputs(inputs)
        k = self.project_k(inputs).view(B, N, H, -1).transpose(1, 2)       # (B, H, N, d)
        v = self.project_v(inputs).view(B, N, H, -1).transpose(1, 2)
        k = ((self.slot_size // H) ** -0.5) * k
        for i in range(self.num_iter):
            if i == self.num_iter - 1 and self.truncate == "bi-level":
                slots = slots.detach() + slots_init - slots_init.detach()
            elif i == self.num_iter - 1 and self.truncate == "fixed-point":
                slots = slots.detach()
            slots_prev = slots
            q = self.project_q(self.norm_slots(slots)).view(B, K, H, -1).transpose(1, 2)   # (B, H, K, d)
            attn_logits = torch.matmul(k, q.transpose(-1, -2))                            # (B, H, N, K)
            attn = F.softmax(attn_logits.transpose(1, 2).reshape(B, N, H * K), dim=-1)
            attn = attn.view(B, N, H, K).transpose(1, 2)
            attn_vis = attn.sum(1)                                                        # (B, N, K)
            attn = attn + self.epsilon
            attn = attn / torch.sum(attn, dim=-2, keepdim=True)
            updates = torch.matmul(attn.transpose(-1, -2), v).transpose(1, 2).reshape(B, K, -1)
            slots = self.gru(updates.view(-1, self.slot_size), slots_prev.reshape(-1, self.slot_size))
            slots = slots.view(-1, K, self.slot_size)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots, attn_vis, attn_logits


class SlotAttentionEncoder(nn.Module):
    def __init__(self, iters: int, num_slots: int, width: int, slot_size: int, mlp_size: int, truncate: str,
                 init_method: str, heads: int = 1):
        super().__init__()
        self.num_slots, self.slot_size, self.init_method = num_slots, slot_size, init_method
        self.layer_norm = nn.LayerNorm(width)
        self.mlp = mlp(width, width)
        if init_method == "shared_gaussian":
            self.slot_mu = nn.Parameter(nn.init.xavier_uniform_(torch.zeros(1, 1, slot_size)))
            self.slot_log_sigma = nn.Parameter(nn.init.xavier_uniform_(torch.zeros(1, 1, slot_size)))
        else:
            self.slots_init = nn.Embedding(num_slots, slot_size)
            nn.init.xavier_uniform_(self.slots_init.weight)
        self.slot_attention = SlotAttention(iters, width, slot_size, mlp_size, truncate, heads)

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        """noise: the shared-Gaussian draw (B, K, S) for tests; the reference draws it here."""
        B = x.shape[0]
        x = self.mlp(self.layer_norm(x))
        if self.init_method == "shared_gaussian":
            if noise is None:
                noise = torch.empty((B, self.num_slots, self.slot_size), dtype=x.dtype, device=x.device).normal_()
            init = self.slot_mu + torch.exp(self.slot_log_sigma) * noise
        else:
            init = self.slots_init.weight.expand(B, -1, -1).contiguous()
        slots, attn, logits = self.slot_attention(x, init)
        return slots, attn, init, logits


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float = 0.0, gain: float = 1.0):
        super().__init__()
        self.num_heads = heads
        self.attn_dropout, self.output_dropout = nn.Dropout(dropout), nn.Dropout(dropout)
        self.proj_q = linear(d_model, d_model, bias=False)
        self.proj_k = linear(d_model, d_model, bias=False)
        self.proj_v = linear(d_model, d_model, bias=False)
        self.proj_o = linear(d_model, d_model, bias=False, gain=gain)

    def forward(self, q, k, v, attn_mask=None):
        """-> output (B, T, D) and the probabilities (B, h, T, S) that enter the dropout."""
        B, T, _ = q.shape
        S = k.shape[1]
        q = self.proj_q(q).view(B, T, self.num_heads, -1).transpose(1, 2)
        k = self.proj_k(k).view(B, S, self.num_heads, -1).transpose(1, 2)
        v = self.proj_v(v).view(B, S, self.num_heads, -1).transpose(1, 2)
        q = q * (q.shape[-1] ** -0.5)
        attn = torch.matmul(q, k.transpose(-1, -2))
        if attn_mask is not None:
            attn = attn.masked_fill(attn_mask, float("-inf"))
        probs = F.softmax(attn, dim=-1)
        out = torch.matmul(self.attn_dropout(probs), v).transpose(1, 2).reshape(B, T, -1)
        return self.output_dropout(self.proj_o(out)), probs


class DecoderBlock(nn.Module):
    def __init__(self, max_len: int, d_model: int, heads: int, cross_heads: int, dropout: float, gain: float,
                 is_first: bool):
        super().__init__()
        self.is_first = is_first
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, heads, dropout, gain)
        mask = torch.triu(torch.ones((max_len, max_len), dtype=torch.bool), diagonal=1)
        self.self_attn_mask = nn.Parameter(mask, requires_grad=False)
        self.encoder_decoder_attn_layer_norm = nn.LayerNorm(d_model)
        self.encoder_decoder_attn = MultiHeadAttention(d_model, cross_heads, dropout, gain)
        self.ffn_layer_norm = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(linear(d_model, 4 * d_model, init="kaiming"), nn.ReLU(),
                                 linear(4 * d_model, d_model, gain=gain), nn.Dropout(dropout))

    def forward(self, x, slots):
        T = x.shape[1]
        mask = self.self_attn_mask[:T, :T]
        if self.is_first:
            x = self.self_attn_layer_norm(x)
            x = x + self.self_attn(x, x, x, mask)[0]
        else:
            h = self.self_attn_layer_norm(x)
            x = x + self.self_attn(h, h, h, mask)[0]
        h = self.encoder_decoder_attn_layer_norm(x)
        h, probs = self.encoder_decoder_attn(h, slots, slots)
        x = x + h
        return x + self.ffn(self.ffn_layer_norm(x)), probs


class TransformerDecoder(nn.Module):
    def __init__(self, blocks: int, max_len: int, d_model: int, heads: int, dropout: float, cross_heads: int):
        super().__init__()
        gain = (3 * blocks) ** -0.5
        self.blocks = nn.ModuleList(
            DecoderBlock(max_len, d_model, heads, heads if i == 0 else cross_heads, dropout, gain, i == 0)
            for i in range(blocks))
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, x, slots):
        """-> output (B, T, D) and the last block's cross-attention probabilities."""
        for block in self.blocks:
            x, probs = block(x, slots)
        return self.layer_norm(x), probs


class ReferenceSPOT(nn.Module):
    """The reference's `SPOT(encoder, args, second_encoder)` for the transformer decoder."""

    def __init__(self, cfg, encoder: nn.Module, second_encoder: nn.Module | None = None,
                 finetune_blocks_after: int = 100, eval_orders: str | None = None):
        super().__init__()
        sa, dec, D = cfg.slot_attention, cfg.decoder, cfg.feature_dim
        self.encoder, self.second_encoder = encoder, second_encoder
        for name, p in encoder.named_parameters():
            p.requires_grad = name.startswith("blocks.") and int(name.split(".")[1]) >= finetune_blocks_after
        if second_encoder is not None:
            second_encoder.requires_grad_(False)
        self.num_slots, self.d_model = sa.num_slots, D
        self.slot_attn = SlotAttentionEncoder(sa.num_iterations, sa.num_slots, D, sa.slot_size, sa.mlp_hidden,
                                              sa.truncate, sa.init, sa.num_heads)
        self.input_proj = nn.Sequential(linear(D, D, bias=False), nn.LayerNorm(D))
        N = cfg.encoder.num_patches
        self.permutations = list(patch_orders(cfg.grid_size)[: dec.num_orders])
        self.train_permutations = dec.train_orders if dec.num_orders > 1 else "standard"
        self.eval_permutations = eval_orders or dec.eval_orders
        self.bos_tokens = nn.Parameter(torch.zeros(len(self.permutations), 1, 1, D))
        nn.init.normal_(self.bos_tokens, std=0.02)
        self.slot_proj = nn.Sequential(linear(sa.slot_size, D, bias=False), nn.LayerNorm(D))
        self.dec = TransformerDecoder(dec.num_blocks, N, D, dec.num_heads, 0.0, dec.cross_heads)

    def forward_encoder(self, x: torch.Tensor, encoder: nn.Module) -> torch.Tensor:
        encoder.eval()
        x = encoder.prepare_tokens(x)
        for blk in encoder.blocks:
            x = blk(x)
        return x[:, 1:]                                                   # CLS dropped, no final norm

    def which_orders(self) -> list[int]:
        mode = self.train_permutations if self.training else self.eval_permutations
        every = list(range(len(self.permutations)))
        return {"standard": [0], "random": [random.choice(every)], "all": every}[mode]

    def forward_decoder(self, slots: torch.Tensor, target: torch.Tensor):
        recons, masks = [], []
        for p in self.which_orders():
            perm = self.permutations[p].to(target.device)
            bos = self.bos_tokens[p].expand(target.shape[0], -1, -1)
            x = self.input_proj(torch.cat((bos, target[:, perm, :][:, :-1, :]), dim=1))
            out, probs = self.dec(x, self.slot_proj(slots))
            probs = probs.sum(dim=1)                                      # (B, N, K) over heads
            probs = probs / probs.sum(dim=2, keepdim=True)
            inv = torch.argsort(perm)
            masks.append(probs[:, inv, :])
            recons.append(out[:, inv, :])
        return torch.stack(recons).mean(0), torch.stack(masks).mean(0)

    def forward(self, image: torch.Tensor, noise: torch.Tensor | None = None):
        """-> (mse, slot masks (B, K, h, w), decoder masks (B, K, h, w), slots, recon, logits (B, N, K))."""
        B = image.shape[0]
        emb_input = self.forward_encoder(image, self.encoder)
        with torch.no_grad():
            if self.second_encoder is not None:
                target = self.forward_encoder(image, self.second_encoder)
            else:
                target = emb_input.clone().detach()
        slots, slot_masks, _, logits = self.slot_attn(emb_input, noise)
        logits = logits.squeeze()
        recon, dec_masks = self.forward_decoder(slots, target)
        h = int(math.sqrt(target.shape[1]))
        mse = ((target - recon) ** 2).sum() / (B * h * h * self.d_model)
        slot_masks = slot_masks.transpose(-1, -2).reshape(B, self.num_slots, h, h)
        dec_masks = dec_masks.transpose(-1, -2).reshape(B, self.num_slots, h, h)
        return mse, slot_masks, dec_masks, slots, recon, logits
