"""Fused Triton kernels for one Slot Attention step (spec section 2, step 4), forward and backward.

Written for spot-fast from the maths in the spec; no code is taken from other kernels. The plain
PyTorch reference with the same signature is `slot_attention_step_ref` (attention_step_ref.py), the
dispatcher between the two is `slot_attention_step` (attention_step.py), and
tests/test_kernel_attention_step.py holds the kernel to the reference, forward and backward.

Shapes: B batch, H heads, N patches, K slots, DH = S / H the per-head width (not the spec's token
width D), J = H * K (the joint softmax axis).

The trick that keeps everything 2-D: the heads are laid side by side. A block of patches is loaded
as k_cat (BLOCK_N, H*DH) (column c belongs to head c // DH), and q as a block-diagonal matrix
q_bd^T (H*DH, J) that is zero wherever the column's head and the slot's head differ. Then
`k_cat @ q_bd^T` is the (BLOCK_N, J) matrix of every head's logits side by side, so the joint
softmax over heads and slots is a plain row softmax. With H = 1 nothing is wasted; with H heads the
products do H times the needed arithmetic, which is cheap here (the step is memory-bound).

Forward, grid (B, n_splits): each program walks its chunk of patches in blocks of BLOCK_N and keeps
in registers the column sums c[j] = sum_n (p + eps) and the unnormalised updates
acc[j] = sum_n (p + eps) v[n]. The normalisation over patches is linear, so it is applied once at
the end: updates = (sum over splits of acc) / (sum over splits of c). One pass over the patches,
no atomics (a small reduction kernel sums the splits in a fixed order, so results are deterministic),
and the (B, N, K) attention is written only when the caller asks for it (the last iteration).
When gradients are needed the kernel also stores the joint softmax p (B, N, J, fp32*).

Backward, grid (B, n_splits), one pass over the patches reading the forward's p. With w = (p + eps) / c
and u = w^T v, the column term that seems to need a first pass over N is
    g[j] = sum_n dw[n, j] w[n, j] = du[j] . u[j]
which the program gets from the saved updates, so no first pass is needed:
    dv = w du;  dw = v du^T;  dp = (dw - g) / c + d_attn_vis (broadcast over heads);
    dlogits = p * (dp - sum_j p dp) + d_logits;  dk = dlogits q;  dq = dlogits^T k (split-summed).

Why the backward reads p instead of recomputing it. With confident slots (p nearly one-hot, logits
spread over tens) `p * (dp - sum_j p dp)` cancels almost exactly, so it is only as good as the
identity sum_j p = 1 that the backward's p satisfies. A recomputed p = exp(k.q - lse) breaks it by
about one ulp of the largest logit (~4e-6 at 60): the forward's and the backward's products differ
in their last bits (their BLOCK_N differ and autotune picks each on its own; reduction orders follow
the tile shape), and lse = max + log(sum) is itself rounded to an ulp of the max. Saving p makes
the backward use exactly the forward's probabilities, whatever the configs: it costs writing and
reading B*N*J fp32 (~1.4% of the k and v bytes at COCO, B=64 N=196 K=7 S=256) and removes the
backward's k.q product. Without gradients (eval) nothing is saved.

Precision. fp32 inputs: IEEE fp32 products (no TF32), except three that take fp64 operands and
sums (products of fp32 values are exact in fp64) and are rounded once to fp32 afterwards:
  - the logits k.q and the backward's dw = v.du, long (H*DH) products, C_BLOCK columns at a time
    so that the fp64 tiles stay small. A 256-long fp32 running sum (one tl.dot on the interpreter,
    an FMA dot on a GPU) is ~2.5x less accurate than PyTorch's blocked CPU matmul, and confident
    slots pass that error on amplified;
  - the updates' sums acc and c. The backward's g = du . u divides by c, and for a slot that no
    patch attends to (c ~ N * eps) any fp32-accumulated u makes dk and dq several times less
    accurate than PyTorch's, which sums dw * w over the patches instead; a u rounded once is fine.
With these the kernel's error against fp64 stays at or below PyTorch fp32's
(tests/test_kernel_attention_step.py). bf16/fp16 inputs: tensor-core products with fp32
accumulation. Softmax, the saved p and the saved updates stay fp32 ("fp32*" in the kernels'
comments: fp32, or fp64 for fp64 inputs, which exist for gradcheck). Under TRITON_INTERPRET (the CPU tests) 16-bit operands are upcast to fp32, because the
interpreter's 16-bit tl.dot is wrong, and fp32 -> bf16 stores are rounded to nearest by hand,
because the interpreter truncates. The fp64 products have not yet been timed on a GPU (sm_80 and
sm_90 have fp64 tensor cores; elsewhere Triton uses fp64 FMAs).

Limits: H*DH <= 256 and H*K <= 64 (register budget); other sizes fall back to the reference in the
dispatcher (`supported`). Autotuning is on for GPUs (SPOT_FAST_AUTOTUNE=0 uses one fixed config).
Under torch.compile the launchers run as opaque custom ops (`spot_fast::slot_attention_fwd/bwd`),
so Dynamo traces the autograd.Function without tracing into Triton. Not fused: when k and v feed
several iterations, autograd still sums their per-iteration gradients in separate kernels.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from spot_fast.kernels.attention_step_ref import EPSILON, slot_attention_step_ref

__all__ = ["slot_attention_step_triton", "slot_attention_step_ref", "SlotAttentionStep", "supported"]

MAX_WIDTH = 256         # H * DH: one program holds a (BLOCK_N, H*DH) block of k and of v
MAX_JOINT = 64          # H * K: the joint softmax axis, padded to a power of two >= 16
MIN_CHUNK = 64          # fewest patches one program walks (a multiple of every BLOCK_N)
REDUCE_BLOCK = 1024     # elements per program in the split-reduction kernel
C_BLOCK = tl.constexpr(16)  # columns per step of the long (H*DH) products: keeps their fp64 tiles small
FP32_DOT = "ieee"       # fp32 products: "ieee" (exact) or "tf32x3"; env SPOT_FAST_FP32_DOT overrides


def _read_interpret() -> bool:
    """Whether TRITON_INTERPRET is on, read as Triton reads it ("0" or unset is off)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


INTERPRETING = _read_interpret()   # the kernels run on Triton's CPU interpreter; fixed at import,
                                   # as @triton.jit fixes it


def _autotune_enabled() -> bool:
    return not INTERPRETING and os.environ.get("SPOT_FAST_AUTOTUNE", "1") not in ("", "0")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)          # not triton.cdiv: that is a JIT function, ~4 us a call from Python


def _pad(n: int) -> int:
    """Power of two >= max(n, 16): tl.dot on a GPU needs every dimension >= 16."""
    return max(16, 1 << (n - 1).bit_length())


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

# The interpreter casts fp32 -> bf16 by truncation; round to nearest even by hand there.
_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRETING)


@triton.jit
def _cast(x, DTYPE: tl.constexpr):
    """x cast to an output dtype with round-to-nearest-even, as on a GPU."""
    if _ROUND_BF16_BY_HAND and DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits & 0xFFFF0000).to(tl.float32, bitcast=True).to(DTYPE)
    return x.to(DTYPE)


@triton.jit
def _mm(a, b, DT: tl.constexpr, PREC: tl.constexpr):
    """a @ b with the operands cast to DT: fp32 (PREC products) or 16-bit (tensor cores) give an
    fp32 result; fp64 (the long products of fp32 inputs, and fp64 inputs) gives fp64."""
    if DT == tl.float64:
        return tl.dot(a.to(DT), b.to(DT), out_dtype=tl.float64)
    elif DT == tl.float32:
        return tl.dot(a.to(DT), b.to(DT), input_precision=PREC)
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def _joint_indices(H: tl.constexpr, K: tl.constexpr, DH: tl.constexpr, J_PAD: tl.constexpr,
                   C_PAD: tl.constexpr):
    """Index vectors over the joint axes: j = (head, slot) < H*K and c = (head, feature) < H*DH, and
    the (C_PAD, J_PAD) mask of the block diagonal, where c and j belong to the same head."""
    jj = tl.arange(0, J_PAD)
    cc = tl.arange(0, C_PAD)
    head_j, slot_j = jj // K, jj % K
    head_c, dim_c = cc // DH, cc % DH
    j_ok = jj < H * K
    c_ok = cc < H * DH
    diag = (head_c[:, None] == head_j[None, :]) & c_ok[:, None] & j_ok[None, :]
    return jj, head_j, slot_j, j_ok, head_c, dim_c, c_ok, diag


@triton.jit
def _load_block_diag(ptr, b, sb, sh, sk, sd, head_j, slot_j, dim_c, diag):
    """(C_PAD, J_PAD) tile of a (B, H, K, DH) tensor x, transposed and block-diagonal:
    entry (c, j) is x[b, head(j), slot(j), feature(c)] where c and j share a head, else 0."""
    return tl.load(ptr + b * sb + head_j[None, :] * sh + slot_j[None, :] * sk + dim_c[:, None] * sd,
                   mask=diag, other=0.0)


@triton.jit
def _rows(ptr, b, sb, sn, nn, cols):
    """Pointers to rows nn of x[b] for a (B, H, N, DH) tensor x, heads side by side: (BLOCK_N, C_PAD);
    `cols` = head * stride_h + feature * stride_d of each joint column."""
    return ptr + b * sb + nn[:, None] * sn + cols[None, :]


@triton.jit
def _row_dots(x_ptr, b, sxb, sxh, sxn, sxd, nn, n_ok, y_ptr, syb, syh, syk, syd, head_j, slot_j, j_ok,
              H: tl.constexpr, DH: tl.constexpr, C_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
              J_PAD: tl.constexpr, WIDE_DT: tl.constexpr, WIDE_ACC: tl.constexpr, PREC: tl.constexpr,
              ACC: tl.constexpr):
    """(BLOCK_N, J_PAD) fp32* products x[b, head(j), n] . y[b, head(j), slot(j)] for rows nn of a
    (B, H, N, DH) tensor x and a (B, H, K, DH) tensor y: the long (H*DH) products, taken with
    operands WIDE_DT and sums WIDE_ACC (fp64 for fp32 inputs, see header), C_BLOCK columns at a
    time so that the wide tiles stay small."""
    out = tl.zeros((BLOCK_N, J_PAD), dtype=WIDE_ACC)
    for c0 in range(0, C_PAD, C_BLOCK):
        cc = c0 + tl.arange(0, C_BLOCK)
        head_c, dim_c = cc // DH, cc % DH
        c_ok = cc < H * DH
        x = tl.load(_rows(x_ptr, b, sxb, sxn, nn, head_c * sxh + dim_c * sxd),
                    mask=n_ok[:, None] & c_ok[None, :], other=0.0)
        diag = (head_c[:, None] == head_j[None, :]) & c_ok[:, None] & j_ok[None, :]
        y = _load_block_diag(y_ptr, b, syb, syh, syk, syd, head_j, slot_j, dim_c, diag)
        out += _mm(x, y, WIDE_DT, PREC)
    return out.to(ACC)


@triton.jit
def _fwd_kernel(
    k_ptr, q_ptr, v_ptr,                    # (B, H, N, DH), (B, H, K, DH), (B, H, N, DH), any strides
    acc_ptr, col_ptr,                       # WIDE_ACC (B, n_splits, J, DH), (B, n_splits, J)
    p_ptr,                                  # fp32* (B, N, J): the joint softmax, if SAVE_P
    vis_ptr, logits_ptr,                    # (B, N, K), (B, H, N, K) contiguous, if RETURN_ATTN
    N, chunk,
    skb, skh, skn, skd,
    sqb, sqh, sqk, sqd,
    svb, svh, svn, svd,
    H: tl.constexpr, K: tl.constexpr, DH: tl.constexpr,
    J_PAD: tl.constexpr, C_PAD: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, RETURN_ATTN: tl.constexpr, SAVE_P: tl.constexpr, DT: tl.constexpr,
    WIDE_DT: tl.constexpr, WIDE_ACC: tl.constexpr, PREC: tl.constexpr, EPS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    J: tl.constexpr = H * K
    jj, head_j, slot_j, j_ok, head_c, dim_c, c_ok, diag = _joint_indices(H, K, DH, J_PAD, C_PAD)
    v_cols = head_c * svh + dim_c * svd

    ACC = p_ptr.dtype.element_ty            # fp32 (fp64 for fp64 inputs): logits, softmax
    acc = tl.zeros((J_PAD, C_PAD), dtype=WIDE_ACC)                              # see header
    col = tl.zeros((J_PAD,), dtype=WIDE_ACC)
    n_start = split * chunk
    n_end = tl.minimum(n_start + chunk, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        n_ok = nn < n_end
        kv_ok = n_ok[:, None] & c_ok[None, :]
        v_blk = tl.load(_rows(v_ptr, b, svb, svn, nn, v_cols), mask=kv_ok, other=0.0)
        logits = _row_dots(k_ptr, b, skb, skh, skn, skd, nn, n_ok, q_ptr, sqb, sqh, sqk, sqd,
                           head_j, slot_j, j_ok, H, DH, C_PAD, BLOCK_N, J_PAD, WIDE_DT, WIDE_ACC, PREC, ACC)
        logits = tl.where(j_ok[None, :], logits, float("-inf"))
        m = tl.max(logits, axis=1)
        e = tl.exp(logits - m[:, None])
        s = tl.sum(e, axis=1)
        p = e / s[:, None]                                                        # joint softmax
        nj_ok = n_ok[:, None] & j_ok[None, :]
        if SAVE_P:                                                # for the backward (see header)
            tl.store(p_ptr + (b * N + nn[:, None]) * J + jj[None, :], p, mask=nj_ok)
        a = tl.where(nj_ok, p + EPS, 0.0)
        col += tl.sum(a.to(WIDE_ACC), axis=0)
        acc += _mm(tl.trans(a), v_blk, WIDE_DT, PREC)                            # (J_PAD, C_PAD)
        if RETURN_ATTN:
            tl.store(logits_ptr + ((b * H + head_j[None, :]) * N + nn[:, None]) * K + slot_j[None, :],
                     _cast(logits, logits_ptr.dtype.element_ty), mask=nj_ok)
            kk = tl.arange(0, K_PAD)
            if H == 1:
                vis = p                                                           # J_PAD == K_PAD
            else:                                                                 # sum over heads
                pick = (slot_j[:, None] == kk[None, :]) & j_ok[:, None]
                vis = _mm(p, pick, ACC, "ieee")                                   # (BLOCK_N, K_PAD)
            tl.store(vis_ptr + (b * N + nn[:, None]) * K + kk[None, :],
                     _cast(vis, vis_ptr.dtype.element_ty), mask=n_ok[:, None] & (kk[None, :] < K))

    part = b * n_splits + split
    tl.store(acc_ptr + (part * J + jj[:, None]) * DH + dim_c[None, :], acc, mask=tl.trans(diag))
    tl.store(col_ptr + part * J + jj, col, mask=j_ok)


@triton.jit
def _bwd_kernel(
    k_ptr, q_ptr, v_ptr,                    # as in the forward
    du_ptr,                                 # (B, H, K, DH) gradient of the updates, any strides
    u_ptr, col_ptr, p_ptr,                  # saved, fp32*: updates (B, J, DH), col sums (B, J),
                                            # the forward's joint softmax p (B, N, J)
    dvis_ptr, dlogits_ptr,                  # (B, N, K), (B, H, N, K), any strides, if given
    dk_ptr, dv_ptr,                         # like k, v (strides passed)
    dq_ptr,                                 # fp32* (B, n_splits, J, DH): per-split partial dq
    N, chunk,
    skb, skh, skn, skd,
    sqb, sqh, sqk, sqd,
    svb, svh, svn, svd,
    sub, suh, suk, sud,
    sab, san, sak,
    slb, slh, sln, slk,
    sdkb, sdkh, sdkn, sdkd,
    sdvb, sdvh, sdvn, sdvd,
    H: tl.constexpr, K: tl.constexpr, DH: tl.constexpr,
    J_PAD: tl.constexpr, C_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_DVIS: tl.constexpr, HAS_DLOGITS: tl.constexpr,
    DT: tl.constexpr, WIDE_DT: tl.constexpr, WIDE_ACC: tl.constexpr, PREC: tl.constexpr, EPS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    J: tl.constexpr = H * K
    jj, head_j, slot_j, j_ok, head_c, dim_c, c_ok, diag = _joint_indices(H, K, DH, J_PAD, C_PAD)
    q_t = _load_block_diag(q_ptr, b, sqb, sqh, sqk, sqd, head_j, slot_j, dim_c, diag)
    du_t = _load_block_diag(du_ptr, b, sub, suh, suk, sud, head_j, slot_j, dim_c, diag)
    u_t = _load_block_diag(u_ptr, b, J * DH, K * DH, DH, 1, head_j, slot_j, dim_c, diag)   # contiguous
    ACC = dq_ptr.dtype.element_ty           # fp32 (fp64 for fp64 inputs)
    g = tl.sum(du_t.to(ACC) * u_t, axis=0)                                       # du[j] . u[j]
    inv_col = 1.0 / tl.load(col_ptr + b * J + jj, mask=j_ok, other=1.0)
    q_t = q_t.to(DT)
    du_t = du_t.to(DT)
    k_cols = head_c * skh + dim_c * skd
    dk_cols = head_c * sdkh + dim_c * sdkd
    dv_cols = head_c * sdvh + dim_c * sdvd

    dq_t = tl.zeros((C_PAD, J_PAD), dtype=ACC)
    n_start = split * chunk
    n_end = tl.minimum(n_start + chunk, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        n_ok = nn < n_end
        kv_ok = n_ok[:, None] & c_ok[None, :]
        nj_ok = n_ok[:, None] & j_ok[None, :]
        k_blk = tl.load(_rows(k_ptr, b, skb, skn, nn, k_cols), mask=kv_ok, other=0.0).to(DT)
        p = tl.load(p_ptr + (b * N + nn[:, None]) * J + jj[None, :], mask=nj_ok, other=0.0)
        dw = _row_dots(v_ptr, b, svb, svh, svn, svd, nn, n_ok, du_ptr, sub, suh, suk, sud,
                       head_j, slot_j, j_ok, H, DH, C_PAD, BLOCK_N, J_PAD, WIDE_DT, WIDE_ACC, PREC,
                       ACC)                                                       # v[n] . du[j]
        w = tl.where(nj_ok, (p + EPS) * inv_col[None, :], 0.0)
        dp = (dw - g[None, :]) * inv_col[None, :]
        if HAS_DVIS:
            dp += tl.load(dvis_ptr + b * sab + nn[:, None] * san + slot_j[None, :] * sak,
                          mask=nj_ok, other=0.0).to(ACC)
        dlog = p * (dp - tl.sum(p * dp, axis=1)[:, None])
        if HAS_DLOGITS:
            dlog += tl.load(dlogits_ptr + b * slb + head_j[None, :] * slh + nn[:, None] * sln
                            + slot_j[None, :] * slk, mask=nj_ok, other=0.0).to(ACC)
        dlog = tl.where(nj_ok, dlog, 0.0)
        dk = _mm(dlog, tl.trans(q_t), DT, PREC)                                   # (BLOCK_N, C_PAD)
        dv = _mm(w, tl.trans(du_t), DT, PREC)
        dq_t += _mm(tl.trans(k_blk), dlog, DT, PREC)                              # (C_PAD, J_PAD)
        tl.store(_rows(dk_ptr, b, sdkb, sdkn, nn, dk_cols), _cast(dk, dk_ptr.dtype.element_ty), mask=kv_ok)
        tl.store(_rows(dv_ptr, b, sdvb, sdvn, nn, dv_cols), _cast(dv, dv_ptr.dtype.element_ty), mask=kv_ok)

    part = b * n_splits + split
    tl.store(dq_ptr + (part * J + jj[None, :]) * DH + dim_c[:, None], dq_t, mask=diag)


@triton.jit
def _sum_splits_kernel(
    part_ptr,                               # fp32* (B, n_splits, E): per-split partial sums
    col_part_ptr,                           # fp32* (B, n_splits, J): per-split column sums, if DIVIDE
    out_ptr, out32_ptr, col_out_ptr,        # (B, E) out dtype; fp32* (B, E) if WRITE32; fp32* (B, J)
    n_splits, E, J,
    DH: tl.constexpr, BLOCK: tl.constexpr, DIVIDE: tl.constexpr, WRITE32: tl.constexpr,
):
    """Sums the splits in a fixed order; with DIVIDE, divides by the summed column sums too."""
    b = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = e < E
    ACC = part_ptr.dtype.element_ty
    total = tl.zeros((BLOCK,), dtype=ACC)
    for s in range(n_splits):
        total += tl.load(part_ptr + (b * n_splits + s) * E + e, mask=ok, other=0.0)
    if DIVIDE:
        j = e // DH
        col = tl.zeros((BLOCK,), dtype=ACC)
        for s in range(n_splits):
            col += tl.load(col_part_ptr + (b * n_splits + s) * J + j, mask=ok, other=1.0)
        total = total / col
        tl.store(col_out_ptr + b * J + j, col.to(col_out_ptr.dtype.element_ty), mask=ok & (e % DH == 0))
    tl.store(out_ptr + b * E + e, _cast(total, out_ptr.dtype.element_ty), mask=ok)
    if WRITE32:
        tl.store(out32_ptr + b * E + e, total.to(out32_ptr.dtype.element_ty), mask=ok)


# Launch configs (BLOCK_N, num_warps, num_stages), picked by compiling for sm_90 without a GPU
# (ptxas register and spill counts at the benchmark shapes, fp32 and bf16: attention_step_registers.py):
# the backward holds about twice the forward's live tiles; in fp32 it needs BLOCK_N = 16 and 8 warps
# not to spill at K = 7 (176 registers), and spills ~100 bytes at K = 24 whatever the config. The
# forward (fp64 update sums; k read C_BLOCK columns at a time) needs 180 registers at K = 7 and 199
# at K = 24 with its default, without spills. The interpreter (which rejects several configs) and
# SPOT_FAST_AUTOTUNE=0 use the defaults; GPUs autotune over the lists.
_FWD_DEFAULT, _BWD_DEFAULT = (32, 8, 1), (16, 8, 1)
_FWD_CONFIGS = [(16, 8, 1), (16, 8, 2), (32, 8, 1), (32, 4, 1), (64, 8, 1)]
_BWD_CONFIGS = [(16, 8, 1), (16, 8, 2), (32, 8, 1)]


def _configs(triples):
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn, w, s in triples]


_fwd_tuned = triton.autotune(_configs(_FWD_CONFIGS), key=["H", "K", "DH", "chunk", "RETURN_ATTN"])(
    _fwd_kernel)
_bwd_tuned = triton.autotune(_configs(_BWD_CONFIGS), key=["H", "K", "DH", "chunk", "HAS_DVIS", "HAS_DLOGITS"])(
    _bwd_kernel)


def _launch(kernel, tuned, default, grid, *args, **meta):
    if _autotune_enabled():
        tuned[grid](*args, **meta)
    else:
        bn, w, s = default
        kernel[grid](*args, **meta, BLOCK_N=bn, num_warps=w, num_stages=s)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _split(B: int, N: int, device: torch.device) -> tuple[int, int]:
    """(chunk, n_splits): split the patches so that about two programs run per SM."""
    want = _cdiv(2 * _num_sms(device), B)
    chunk = max(MIN_CHUNK, _cdiv(_cdiv(N, want), MIN_CHUNK) * MIN_CHUNK)
    return chunk, _cdiv(N, chunk)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
              torch.float64: tl.float64}


def supported(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel handles these inputs (else the dispatcher uses the reference)."""
    if k.dim() != 4 or q.dim() != 4 or v.shape != k.shape:
        return False
    B, H, N, DH = k.shape
    if q.shape[0] != B or q.shape[1] != H or q.shape[3] != DH or N == 0 or q.shape[2] == 0:
        return False
    if not (k.dtype == q.dtype == v.dtype) or k.dtype not in _TL_DTYPES:
        return False
    return H * DH <= MAX_WIDTH and H * q.shape[2] <= MAX_JOINT and k.device == q.device == v.device


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulators, softmax statistics and the saved updates: fp32 (fp64 for fp64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot_args(x: torch.Tensor) -> dict:
    """Operand dtypes, sum dtype of the long products and fp32 product precision (see header)."""
    dt = tl.float32 if INTERPRETING and x.dtype != torch.float64 else _TL_DTYPES[x.dtype]
    wide = tl.float64 if dt in (tl.float32, tl.float64) else dt
    return dict(DT=dt, WIDE_DT=wide, WIDE_ACC=tl.float64 if wide == tl.float64 else tl.float32,
                PREC=os.environ.get("SPOT_FAST_FP32_DOT", FP32_DOT))


def _forward_outputs(k, q, return_attn: bool, save_p: bool):
    """Allocates the forward's outputs (shared by the launcher and the custom op's fake):
    updates, updates in the accumulator dtype (16-bit inputs only, else empty), attn_vis and
    logits (empty unless return_attn), column sums (B, J) and the joint softmax p (B, N, J) in
    the accumulator dtype (empty unless save_p)."""
    B, H, N, DH = k.shape
    K = q.shape[2]
    acc = dict(dtype=_acc_dtype(k.dtype), device=k.device)
    return (k.new_empty((B, H, K, DH)),
            torch.empty((B, H, K, DH), **acc) if k.dtype != acc["dtype"] else k.new_empty(0),
            k.new_empty((B, N, K)) if return_attn else k.new_empty(0),
            k.new_empty((B, H, N, K)) if return_attn else k.new_empty(0),
            torch.empty((B, H * K), **acc),
            torch.empty((B, N, H * K) if save_p else (0,), **acc))


def _backward_outputs(k, q, v):
    """Allocates (dk, dq, dv): dk and dv keep k's and v's strides, dq is contiguous."""
    return torch.empty_like(k), q.new_empty(q.shape), torch.empty_like(v)


def _forward(k, q, v, return_attn: bool, save_p: bool, eps: float = EPSILON):
    """Runs the forward kernels; returns `_forward_outputs`, filled. `save_p` keeps the softmax
    for the backward (not needed without gradients)."""
    B, H, N, DH = k.shape
    K = q.shape[2]
    J, E = H * K, H * K * DH
    chunk, n_splits = _split(B, N, k.device)
    out = updates, updates_acc, vis, logits, colsum, p = _forward_outputs(k, q, return_attn, save_p)
    dots = _dot_args(k)
    wide = torch.float64 if dots["WIDE_ACC"] == tl.float64 else torch.float32
    acc_part = torch.empty((B, n_splits, J, DH), dtype=wide, device=k.device)
    col_part = torch.empty((B, n_splits, J), dtype=wide, device=k.device)
    _launch(_fwd_kernel, _fwd_tuned, _FWD_DEFAULT, (B, n_splits),
            k, q, v, acc_part, col_part, p, vis, logits, N, chunk,
            *k.stride(), *q.stride(), *v.stride(),
            H=H, K=K, DH=DH, J_PAD=_pad(J), C_PAD=_pad(H * DH), K_PAD=_pad(K),
            RETURN_ATTN=return_attn, SAVE_P=save_p, EPS=eps, **dots)
    write_acc = updates_acc.numel() > 0
    _sum_splits_kernel[(B, _cdiv(E, REDUCE_BLOCK))](
        acc_part, col_part, updates, updates_acc if write_acc else updates, colsum, n_splits, E, J,
        DH=DH, BLOCK=REDUCE_BLOCK, DIVIDE=True, WRITE32=write_acc)
    return out


def _backward(k, q, v, updates_acc, colsum, p, du, dvis, dlogits, eps: float = EPSILON):
    """Runs the backward kernels; returns (dk, dq, dv). `updates_acc`, `colsum` and `p` are the
    forward's (updates in the accumulator dtype); dvis and dlogits may be None."""
    B, H, N, DH = k.shape
    K = q.shape[2]
    J, E = H * K, H * K * DH
    chunk, n_splits = _split(B, N, k.device)
    dk, dq, dv = _backward_outputs(k, q, v)
    dq_part = torch.empty((B, n_splits, J, DH), dtype=colsum.dtype, device=k.device)
    has_dvis, has_dlogits = dvis is not None, dlogits is not None
    _launch(_bwd_kernel, _bwd_tuned, _BWD_DEFAULT, (B, n_splits),
            k, q, v, du, updates_acc, colsum, p, dvis if has_dvis else dk,
            dlogits if has_dlogits else dk, dk, dv, dq_part, N, chunk,
            *k.stride(), *q.stride(), *v.stride(), *du.stride(),
            *(dvis.stride() if has_dvis else (0, 0, 0)),
            *(dlogits.stride() if has_dlogits else (0, 0, 0, 0)),
            *dk.stride(), *dv.stride(),
            H=H, K=K, DH=DH, J_PAD=_pad(J), C_PAD=_pad(H * DH),
            HAS_DVIS=has_dvis, HAS_DLOGITS=has_dlogits, EPS=eps, **_dot_args(k))
    _sum_splits_kernel[(B, _cdiv(E, REDUCE_BLOCK))](
        dq_part, dq_part, dq, dq, dq_part, n_splits, E, J,
        DH=DH, BLOCK=REDUCE_BLOCK, DIVIDE=False, WRITE32=False)
    return dk, dq, dv


# The launchers as opaque custom ops, used while torch.compile traces (see SlotAttentionStep).
@torch.library.custom_op("spot_fast::slot_attention_fwd", mutates_args=())
def _forward_op(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor, return_attn: bool, save_p: bool,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor]:
    return _forward(k, q, v, return_attn, save_p, eps)


@_forward_op.register_fake
def _(k, q, v, return_attn, save_p, eps):
    return _forward_outputs(k, q, return_attn, save_p)


@torch.library.custom_op("spot_fast::slot_attention_bwd", mutates_args=())
def _backward_op(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor, updates_acc: torch.Tensor,
                 colsum: torch.Tensor, p: torch.Tensor, du: torch.Tensor, dvis: torch.Tensor | None,
                 dlogits: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(k, q, v, updates_acc, colsum, p, du, dvis, dlogits, eps)


@_backward_op.register_fake
def _(k, q, v, updates_acc, colsum, p, du, dvis, dlogits, eps):
    return _backward_outputs(k, q, v)


# ----------------------------------------------------------------------------------------------
# autograd.Function and the functional entry point
# ----------------------------------------------------------------------------------------------

class SlotAttentionStep(torch.autograd.Function):
    """Gradients flow from all three outputs: updates, and (when returned) attn_vis and logits.

    Eager calls go straight to the launchers (a custom op costs ~10 us of dispatch per call); while
    torch.compile traces, the same launchers run as opaque custom ops.
    """

    @staticmethod
    def forward(ctx, k, q, v, return_attn: bool, save_p: bool, eps: float):
        fwd = _forward_op if torch.compiler.is_compiling() else _forward
        updates, updates_acc, vis, logits, colsum, p = fwd(k, q, v, return_attn, save_p, eps)
        ctx.save_for_backward(k, q, v, updates_acc if updates_acc.numel() else updates, colsum, p)
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        if not return_attn:
            return updates, None, None
        return updates, vis, logits

    @staticmethod
    def backward(ctx, du, dvis, dlogits):
        k, q, v, updates_acc, colsum, p = ctx.saved_tensors
        if du is None:
            du = torch.zeros_like(updates_acc)
        bwd = _backward_op if torch.compiler.is_compiling() else _backward
        dk, dq, dv = bwd(k, q, v, updates_acc, colsum, p, du, dvis, dlogits, ctx.eps)
        return dk, dq, dv, None, None, None


def slot_attention_step_triton(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor,
                               return_attn: bool = False, eps: float = EPSILON):
    """Same signature and results as `slot_attention_step_ref`, computed by the fused kernels.

    k, v: (B, H, N, DH), k already scaled by DH^-0.5; q: (B, H, K, DH). Returns (updates (B, H, K, DH),
    attn_vis (B, N, K) or None, logits (B, H, N, K) or None).
    """
    if not supported(k, q, v):
        raise ValueError(f"slot_attention_step_triton: unsupported inputs k {tuple(k.shape)} {k.dtype}, "
                         f"q {tuple(q.shape)} {q.dtype}, v {tuple(v.shape)} {v.dtype} (needs matching "
                         f"fp32/bf16/fp16/fp64, H*head_dim <= {MAX_WIDTH}, H*K <= {MAX_JOINT}); use slot_attention_step, "
                         "which falls back to the reference")
    save_p = torch.is_grad_enabled() and (k.requires_grad or q.requires_grad or v.requires_grad)
    return SlotAttentionStep.apply(k, q, v, return_attn, save_p, eps)
