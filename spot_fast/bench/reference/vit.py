"""DINO's Vision Transformer as the SPOT reference runs it (`torch.hub.load('facebookresearch/dino:main',
'dino_vitb16')`), written from reading DINO's `vision_transformer.py`: attention as an explicit
`q @ k^T`, softmax and `@ v` (no fused kernel), pre-LN blocks, a CLS token, a learned position
table added at the training resolution. Parameter names are DINO's, which are also timm's, so a
timm ViT's `state_dict()` loads as it is (that is how the bench gives both paths the same weights).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from spot_fast.config import EncoderConfig


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                                   # (B, h, T, dh)
        attn = (q @ k.transpose(-2, -1)) * self.scale                      # (B, h, T, T)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, T, C)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)                     # (B, N, D)


class VisionTransformer(nn.Module):
    """DINO's ViT with `prepare_tokens` (patch embedding, CLS, position table) and its blocks;
    `SPOT.forward_encoder` runs the blocks itself, as the reference does."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        spec = cfg.spec
        if spec.num_registers:
            raise ValueError(f"the reference transcription runs DINO ViTs (a CLS token, no registers), "
                             f"not {cfg.name}")
        D = spec.embed_dim
        self.patch_embed = PatchEmbed(spec.patch_size, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, D))
        self.pos_drop = nn.Dropout(0.0)
        self.blocks = nn.ModuleList(Block(D, spec.num_heads, spec.mlp_ratio) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)        # (B, 1+N, D)
        return self.pos_drop(x + self.pos_embed)     # DINO resamples the table only at another size

    def load_timm(self, state: dict[str, torch.Tensor]) -> None:
        """Load a timm ViT's state dict (same names); every parameter here must be in it."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(f"timm state dict lacks {missing[:3]}")
        self.load_state_dict({k: state[k] for k in own})
