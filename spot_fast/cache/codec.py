"""How token values are stored: fp16 / bf16 / fp32 as they are, fp8 (e4m3) and int8 with one scale per token.

8-bit rows: each token row x (D values) is stored as q = x / s in the 8-bit format with
s = max|x| / FORMAT_MAX (the row's largest value lands on the format's largest), and s as one
float32 beside it (`<array>_scale`, shape (..., L, 1)); an all-zero row has s = 0. The reader
returns q and s as stored; `dequantize` turns them into the compute dtype on the device in one
multiply (int8: a mixed-dtype multiply, one kernel; fp8: torch cannot promote float8 in a
multiply, so one converting copy and one in-place multiply).

    q, s = quantize(x, "int8")                 # (..., D) int8, (..., 1) float32
    y = dequantize(q, s, torch.bfloat16)        # on the device
"""
from __future__ import annotations

import numpy as np
import torch

# Stored numpy dtype of the token arrays. numpy has no bfloat16 or float8: bf16 is stored as its
# raw uint16 bits, fp8 as raw uint8 bits; the manifest records the name ("bf16", "fp8").
STORED_NUMPY = {"fp16": np.float16, "bf16": np.uint16, "fp32": np.float32, "fp8": np.uint8, "int8": np.int8}
STORED_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
                "fp8": torch.float8_e4m3fn, "int8": torch.int8}
FORMAT_MAX = {"fp8": 448.0, "int8": 127.0}      # the largest value of each 8-bit format
QUANTIZED = tuple(FORMAT_MAX)
TOKEN_ARRAYS = ("features", "split_tokens")
SCALE_SUFFIX = "_scale"
FLOAT_OUT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)    # dtypes a reader may return


def scale_name(name: str) -> str:
    """The array holding the per-token scales of token array `name`."""
    return name + SCALE_SUFFIX


def is_quantized(dtype: str) -> bool:
    return dtype in QUANTIZED


def quantize(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., D) floats -> (q (..., D) in the 8-bit format, s (..., 1) float32) with x ~= q * s."""
    x = x.float()
    s = x.abs().amax(-1, keepdim=True) / FORMAT_MAX[dtype]            # (..., 1)
    y = x / torch.where(s > 0, s, torch.ones_like(s))
    if dtype == "int8":
        return y.round().clamp_(-127, 127).to(torch.int8), s
    return y.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn), s


def dequantize(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * s in `dtype`, on q's device; int8 in one mixed-dtype kernel."""
    if q.dtype == torch.int8:
        return torch.mul(q, s.to(dtype))
    return q.to(dtype).mul_(s.to(dtype))


def to_stored(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A float tensor (any device) -> (numpy array in the stored dtype, float32 scales or None)."""
    if dtype in QUANTIZED:
        q, s = quantize(t, dtype)
        bits = q.view(torch.uint8) if dtype == "fp8" else q
        return bits.cpu().numpy(), s.cpu().numpy()
    if dtype == "bf16":
        return t.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16), None
    return t.to(torch.float16 if dtype == "fp16" else torch.float32).cpu().numpy(), None


def stored_tensor(a: np.ndarray, dtype: str) -> torch.Tensor:
    """A stored-dtype numpy array as a tensor of its torch type (bf16/fp8 bits reinterpreted; no copy)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype == "bf16":
        return t.view(torch.bfloat16)
    return t.view(torch.float8_e4m3fn) if dtype == "fp8" else t


def raw_numpy(out: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor's bytes (bf16 as uint16 bits, fp8 as uint8 bits)."""
    if out.dtype == torch.bfloat16:
        return out.view(torch.int16).numpy().view(np.uint16)
    return out.view(torch.uint8).numpy() if out.dtype == torch.float8_e4m3fn else out.numpy()


def from_stored(a: np.ndarray, dtype: str, out: torch.dtype | None = torch.float32,
                pin_memory: bool = False, scale: np.ndarray | None = None) -> torch.Tensor:
    """Numpy array in the stored dtype -> tensor of dtype `out` (None: the stored type as is).

    One pass: the result is allocated (pinned if asked) and filled by a converting copy; for an
    8-bit array with `out` a float dtype, dequantised with `scale` (a host copy the caller asked for)."""
    src = stored_tensor(a, dtype)
    if out is not None and dtype in QUANTIZED:
        return dequantize(src, torch.from_numpy(np.ascontiguousarray(scale)), out)
    if (out is None or out == src.dtype) and not pin_memory:
        return src
    return torch.empty(src.shape, dtype=out or src.dtype, pin_memory=pin_memory).copy_(src)


def error_stats(stored: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Sums that merge across batches (and shards): squared error, squared reference, max |error|,
    max |reference|, and the largest per-token relative error ||e|| / ||x||. Float64 on the host."""
    e = (stored.double() - ref.double()).flatten(0, -2)            # (tokens, D)
    r = ref.double().flatten(0, -2)
    norm = r.norm(dim=-1)
    rel = e.norm(dim=-1) / torch.where(norm > 0, norm, torch.ones_like(norm))
    return {"sq_err": float(e.square().sum()), "sq_ref": float(r.square().sum()),
            "max_abs": float(e.abs().max()) if e.numel() else 0.0,
            "max_ref": float(r.abs().max()) if r.numel() else 0.0,
            "max_token_rel": float(rel.max()) if rel.numel() else 0.0, "tokens": int(e.shape[0])}


def merge_stats(parts: list[dict]) -> dict:
    """Merged error_stats, plus rel_rms = sqrt(sq_err / sq_ref)."""
    if not parts:
        return {}
    out = {"sq_err": sum(p["sq_err"] for p in parts), "sq_ref": sum(p["sq_ref"] for p in parts),
           "tokens": sum(p["tokens"] for p in parts)}
    for k in ("max_abs", "max_ref", "max_token_rel"):
        out[k] = max(p[k] for p in parts)
    out["rel_rms"] = (out["sq_err"] / out["sq_ref"]) ** 0.5 if out["sq_ref"] > 0 else 0.0
    return out
