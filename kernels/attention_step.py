"""The attention step of one Slot Attention iteration: the dispatcher between the fused Triton
kernel (`attention_step_triton.py`) and its plain PyTorch reference (`attention_step_ref.py`).

The kernel module is imported here, at import time, so that its custom ops are registered before
any call (a first call may happen inside a torch.compile trace). Without Triton installed this
module still imports and the dispatcher always runs the reference.
"""
from __future__ import annotations

import os

import torch

from spot_fast.kernels.attention_step_ref import EPSILON, slot_attention_step_ref

try:
    from spot_fast.kernels import attention_step_triton as fused   # registers spot_fast::* ops
except ModuleNotFoundError as err:
    if err.name != "triton":
        raise
    fused = None                                                   # no Triton: reference only

__all__ = ["EPSILON", "slot_attention_step", "slot_attention_step_ref", "triton_available"]


def triton_available(device: torch.device) -> bool:
    """Whether the kernel may run on `device`: CUDA, Triton importable, SPOT_FAST_NO_TRITON unset/"0"."""
    if os.environ.get("SPOT_FAST_NO_TRITON", "0") not in ("", "0"):
        return False
    return fused is not None and device.type == "cuda"


def slot_attention_step(k, q, v, return_attn: bool = False, use_kernel: bool = False):
    """The fused kernel where it can run and is asked for, else the reference; same signature and
    results as `slot_attention_step_ref`.

    The kernel runs when `use_kernel` is true (opt-in: `SlotAttentionConfig.use_kernel`), the
    tensors are on CUDA, Triton imports, SPOT_FAST_NO_TRITON is unset (or "0") and the sizes are
    within its limits (`attention_step_triton.supported`).
    """
    if use_kernel and triton_available(k.device) and fused.supported(k, q, v):
        return fused.slot_attention_step_triton(k, q, v, return_attn=return_attn)
    return slot_attention_step_ref(k, q, v, return_attn=return_attn)
