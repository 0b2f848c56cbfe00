"""Fused relaxed-OT argmax (Triton): the anchor token of every source token, eq. 5.

The torch tiling in :func:`alignmamba.alignment.relaxed_ot_assign` materialises one block of
similarities at a time and passes over it three times in memory (the matmul writes it, the
mask fill rewrites it, the row max reads it). This kernel keeps each block in registers: a
program takes BM source rows, walks the anchor rows BN at a time with ``tl.dot`` and keeps a
running (max, argmax) per row. Memory stays O((T_s + T_a) d); nothing of size T_s x T_a is
ever written.

Semantics are the reference's (:func:`alignmamba.alignment.relaxed_ot_plan`): the argmax over
valid anchor tokens of ``cos(s_i, a_j) - beta |t_i - t_j|``, the lowest index on ties (within
a block ``tl.argmax`` keeps the first maximum, a later block wins only when strictly better);
a row with no valid anchor gets index 0. The inputs are the L2-normalised rows and their dtype
sets the products': fp32 is computed as IEEE fp32 products with fp32 sums (as torch's default
fp32 matmul), bf16/fp16 on tensor cores with fp32 sums (as torch's autocast matmul; the torch
tiling then compares the matmul's rounded half-precision output, this kernel the fp32 sums, so
near-ties can resolve differently: see :func:`ot_argmax`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["ot_argmax", "pick_config"]


@triton.jit
def _dot_t(s, a, IEEE: tl.constexpr):
    """s a^T with fp32 sums: (BM, K) x (BN, K) -> (BM, BN). IEEE: fp32 products (fp32 inputs),
    else the tensor cores' default precision (the half-precision inputs)."""
    if IEEE:
        out = tl.dot(s, tl.trans(a), input_precision="ieee")
    else:
        out = tl.dot(s, tl.trans(a))
    return out


@triton.jit
def _ot_argmax_kernel(s_ptr, a_ptr, am_ptr, ts_ptr, ta_ptr, idx_ptr, Ts, Ta, D, beta,
                      s_sb, s_st, a_sb, a_st, am_sb, ts_sb, ta_sb, idx_sb,
                      HAS_BETA: tl.constexpr, IEEE: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      RESIDENT: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rm = pid * BM + tl.arange(0, BM)
    row_ok = rm < Ts
    rk = tl.arange(0, BK)
    if HAS_BETA:
        t_src = tl.load(ts_ptr + b * ts_sb + rm, mask=row_ok, other=0.0)
    best = tl.full([BM], float("-inf"), tl.float32)
    best_idx = tl.zeros([BM], dtype=tl.int32)
    if RESIDENT:  # BK covers d: the program's source rows are loaded once, not per anchor block
        s_res = tl.load(s_ptr + b * s_sb + rm[:, None] * s_st + rk[None, :],
                        mask=row_ok[:, None] & (rk < D)[None, :], other=0.0)
    for j0 in range(0, Ta, BN):
        rn = j0 + tl.arange(0, BN)
        col_ok = rn < Ta
        if RESIDENT:
            a = tl.load(a_ptr + b * a_sb + rn[:, None] * a_st + rk[None, :],
                        mask=col_ok[:, None] & (rk < D)[None, :], other=0.0)
            score = _dot_t(s_res, a, IEEE)
        else:
            score = tl.zeros([BM, BN], dtype=tl.float32)
            for k0 in range(0, D, BK):
                kk = k0 + rk
                k_ok = kk < D
                s = tl.load(s_ptr + b * s_sb + rm[:, None] * s_st + kk[None, :],
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                a = tl.load(a_ptr + b * a_sb + rn[:, None] * a_st + kk[None, :],
                            mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                score += _dot_t(s, a, IEEE)
        if HAS_BETA:
            t_anc = tl.load(ta_ptr + b * ta_sb + rn, mask=col_ok, other=0.0)
            score -= beta * tl.abs(t_src[:, None] - t_anc[None, :])
        valid = tl.load(am_ptr + b * am_sb + rn, mask=col_ok, other=0) != 0
        score = tl.where(valid[None, :], score, float("-inf"))
        m = tl.max(score, axis=1)
        arg = tl.argmax(score, axis=1, tie_break_left=True)
        better = m > best
        best = tl.where(better, m, best)
        best_idx = tl.where(better, arg + j0, best_idx)
    tl.store(idx_ptr + b * idx_sb + rm, best_idx.to(tl.int64), mask=row_ok)


def pick_config(ieee: bool, dim: int) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, num_warps, num_stages) for :func:`ot_argmax`.

    Half precision with d <= 256: 64 source rows kept resident (BK covers d; 64 x 256 bf16 is
    64 registers per thread at 4 warps), 64 anchor rows per step, 2 stages. In the H100 sweep
    (BENCHMARKS.md, "Fused OT argmax") that was 1.24-1.28x the earlier (128, 64, 64, 8, 3) at
    64k and 256k tokens and 0.99-1.15x at batch 32 x 6.4k, d 256. Wider d and fp32 keep the
    K loop (fp32 products on the FMA pipe want smaller tiles than the tensor cores).
    """
    bk = max(16, triton.next_power_of_2(dim))
    if ieee:
        return 64, 64, min(64, bk), 4, 3
    if bk <= 256:
        return 64, 64, bk, 4, 2
    return 128, 64, 64, 8, 3


def ot_argmax(s: Tensor, a: Tensor, anchor_mask: Tensor, t_src: Tensor | None = None,
              t_anchor: Tensor | None = None, beta: float = 0.0, *,
              config: tuple[int, int, int, int, int] | None = None) -> Tensor:
    """Index of the best anchor token for every source token. -> (B, T_s) int64.

    s: (B, T_s, d), a: (B, T_a, d), the L2-normalised rows, one dtype (fp32, bf16 or fp16);
    anchor_mask: (B, T_a) bool, True = a real token; t_src (B, T_s), t_anchor (B, T_a): the
    normalised time positions, needed when ``beta`` != 0. CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1 (tests). The score is ``s_i . a_j - beta |t_i - t_j|`` with fp32 sums
    (module docstring for how half-precision inputs compare with the torch tiling).
    ``config``: (BM, BN, BK, num_warps, num_stages) instead of :func:`pick_config`'s (tests
    and benchmarks); BK >= d keeps the source rows resident.
    """
    if s.dtype != a.dtype or s.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"ot_argmax: s and a must share one of fp32/bf16/fp16, got {s.dtype}, "
                        f"{a.dtype}")
    bsz, ts_len, dim = s.shape
    ta_len = a.shape[1]
    s, a = s.contiguous(), a.contiguous()
    am = anchor_mask.to(device=s.device, dtype=torch.int8).contiguous()
    has_beta = bool(beta)
    if has_beta:
        t_src = t_src.to(device=s.device, dtype=torch.float32).contiguous()
        t_anchor = t_anchor.to(device=s.device, dtype=torch.float32).contiguous()
    else:  # unused by the kernel: any float32 tensors
        t_src = t_anchor = torch.zeros(1, 1, device=s.device, dtype=torch.float32)
    ieee = s.dtype == torch.float32
    bm, bn, bk, warps, stages = config or pick_config(ieee, dim)
    for name, v in (("BM", bm), ("BN", bn), ("BK", bk)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"ot_argmax: config {name}={v} must be a power of 2 >= 16")
    idx = torch.empty(bsz, ts_len, device=s.device, dtype=torch.int64)
    if ts_len == 0:
        return idx
    grid = (triton.cdiv(ts_len, bm), bsz)
    _ot_argmax_kernel[grid](
        s, a, am, t_src, t_anchor, idx, ts_len, ta_len, dim, float(beta),
        s.stride(0), s.stride(1), a.stride(0), a.stride(1), am.stride(0),
        t_src.stride(0), t_anchor.stride(0), idx.stride(0),
        HAS_BETA=has_beta, IEEE=ieee, BM=bm, BN=bn, BK=bk, RESIDENT=bk >= dim,
        num_warps=warps, num_stages=stages,
    )
    return idx
