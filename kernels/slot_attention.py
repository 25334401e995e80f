"""One Slot Attention iteration's attention step (spec section 2, step 4), and its dispatcher.

`slot_attention_step_ref` is the plain PyTorch reference; `slot_attention_step` picks the fused
Triton kernel (`kernels/slot_attention_triton.py`) when CUDA and Triton are present and it is not
switched off (`SPOT_FAST_NO_TRITON=1` or `use_kernel=False`), else the reference.

Shapes: B batch, H heads, N patches, K slots, d = S / H.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

EPSILON = 1e-8


def slot_attention_step_ref(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor,
                            return_attn: bool = False, eps: float = EPSILON):
    """k: (B, H, N, d), already scaled by d^-0.5; q: (B, H, K, d); v: (B, H, N, d).

    Returns (updates (B, H, K, d), attn_vis (B, N, K) or None, logits (B, H, N, K) or None):
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
    updates = torch.matmul(attn.transpose(-1, -2), v)                   # (B, H, K, d)
    return updates, attn_vis, (logits if return_attn else None)


def triton_available(device: torch.device) -> bool:
    if os.environ.get("SPOT_FAST_NO_TRITON", "0") not in ("", "0"):
        return False
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def slot_attention_step(k, q, v, return_attn: bool = False, use_kernel: bool = True):
    """The fused kernel where it can run, else the reference; same signature and results.

    The kernel runs for CUDA tensors when Triton imports, SPOT_FAST_NO_TRITON is unset (or "0"),
    `use_kernel` is true and the sizes are within its limits (`slot_attention_triton.supported`).
    """
    if use_kernel and triton_available(k.device):
        from spot_fast.kernels import slot_attention_triton as fused
        if fused.supported(k, q, v):
            return fused.slot_attention_step_triton(k, q, v, return_attn=return_attn)
    return slot_attention_step_ref(k, q, v, return_attn=return_attn)
