"""Triton kernel of :func:`alignmamba.ssm.causal_conv.causal_conv1d_silu` (inference only).

A program takes BE channels x BL steps of one sample, sums the K taps in fp32 (the taps
before step 0 from the state, or zero), adds the bias, applies SiLU and stores y once in x's
dtype. x may have any strides; y is (B, E, L) contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["conv1d_silu"]


@triton.jit
def _conv_silu_kernel(x_ptr, w_ptr, b_ptr, s_ptr, y_ptr, E, L,
                      x_sb, x_se, x_st, s_sb, s_se, y_sb, y_se,
                      K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
                      BE: tl.constexpr, BL: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    e = tl.program_id(1) * BE + tl.arange(0, BE)
    t = tl.program_id(0) * BL + tl.arange(0, BL)
    e_ok = e < E
    t_ok = t < L
    acc = tl.zeros([BE, BL], dtype=tl.float32)
    for k in tl.static_range(K):
        src = t + (k - (K - 1))  # the step of x this tap reads; < 0: one of the state's
        xv = tl.load(x_ptr + b * x_sb + e[:, None] * x_se + src[None, :] * x_st,
                     mask=e_ok[:, None] & (t_ok & (src >= 0))[None, :], other=0.0)
        xv = xv.to(tl.float32)
        if HAS_STATE:
            sv = tl.load(s_ptr + b * s_sb + e[:, None] * s_se + (src + (K - 1))[None, :],
                         mask=e_ok[:, None] & (t_ok & (src < 0))[None, :], other=0.0)
            xv += sv.to(tl.float32)
        wk = tl.load(w_ptr + e * K + k, mask=e_ok, other=0.0).to(tl.float32)
        acc += wk[:, None] * xv
    if HAS_BIAS:
        acc += tl.load(b_ptr + e, mask=e_ok, other=0.0).to(tl.float32)[:, None]
    y = acc / (1.0 + tl.exp(-acc))
    tl.store(y_ptr + b * y_sb + e[:, None] * y_se + t[None, :], y.to(y_ptr.dtype.element_ty),
             mask=e_ok[:, None] & t_ok[None, :])


def conv1d_silu(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                state: Tensor | None = None) -> Tensor:
    """x: (B, E, L); weight: (E, 1, K); bias: (E,); state: (B, E, K-1) or None -> (B, E, L)."""
    bsz, dim, length = x.shape
    k = weight.shape[-1]
    w = weight.reshape(dim, k).contiguous()
    y = torch.empty(bsz, dim, length, device=x.device, dtype=x.dtype)
    if length == 0:
        return y
    s = state.contiguous() if state is not None else None
    be, bl = 16, 128
    grid = (triton.cdiv(length, bl), triton.cdiv(dim, be), bsz)
    _conv_silu_kernel[grid](
        x, w, bias if bias is not None else w, s if s is not None else x, y, dim, length,
        x.stride(0), x.stride(1), x.stride(2),
        s.stride(0) if s is not None else 0, s.stride(1) if s is not None else 0,
        y.stride(0), y.stride(1),
        K=k, HAS_BIAS=bias is not None, HAS_STATE=s is not None, BE=be, BL=bl, num_warps=4)
    return y
