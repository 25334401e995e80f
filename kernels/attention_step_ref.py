"""One Slot Attention iteration's attention step (spec section 2, step 4) in plain PyTorch.

The reference beside the fused kernel (`attention_step_triton.py`), with the same signature; the
dispatcher that picks between them is `attention_step.py`.

Shapes: B batch, H heads, N patches, K slots, head_dim = S / H.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPSILON = 1e-8   # added to the attention before the normalisation over patches (spec: 1e-8)


def slot_attention_step_ref(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor,
                            return_attn: bool = False, eps: float = EPSILON):
    """k: (B, H, N, head_dim), already scaled by head_dim^-0.5; q: (B, H, K, head_dim); v like k.

    Returns (updates (B, H, K, head_dim), attn_vis (B, N, K) or None, logits (B, H, N, K) or None):
    the softmax runs jointly over the H*K entries of each patch, `attn_vis` sums it over heads,
    and the updates are the (attn + eps)-weighted means of v over the N patches.
    """
    B, H, N, _ = k.shape
    K = q.shape[2]
    logits = torch.matmul(k, q.transpose(-1, -2))                       # (B, H, N, K)
    attn = F.softmax(logits.transpose(1, 2).reshape(B, N, H * K), dim=-1)
    attn = attn.view(B, N, H, K).transpose(1, 2)                        # (B, H, N, K)
    attn_vis = attn.sum(1) if return_attn else None                     # (B, N, K)
    attn = attn + eps
    attn = attn / torch.sum(attn, dim=-2, keepdim=True)                 # normalise over N
    updates = torch.matmul(attn.transpose(-1, -2), v)                   # (B, H, K, head_dim)
    return updates, attn_vis, (logits if return_attn else None)
