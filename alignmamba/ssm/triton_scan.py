"""Triton selective scan (Mamba-1 S6 recurrence), forward and backward, SPEC section 1.

Semantics are those of mamba-ssm's ``selective_scan_ref`` (and of
:func:`alignmamba.ssm.scan.selective_scan_ref`)::

    delta' = softplus(delta + delta_bias)                    (bias, softplus optional)
    h_t    = exp(delta'_t A) h_{t-1} + delta'_t B_t u_t      h: (B, D, N), fp32
    y_t    = C_t . h_t + D u_t
    out    = y * silu(z)                                     (gate optional)

Shapes: u, delta, z (B, D, L); A (D, N) real; B, C (B, N, L) or grouped (B, G, N, L) with
channel d in group d // (D / G); D, delta_bias (D,); initial_state (B, D, N).
State and all accumulation are fp32; ``out`` has ``u.dtype``.

Kernel design (numbers and history in docs/KERNEL_NOTES.md):

* forward: on CUDA where NVRTC works, the CUDA C++ kernel of ``scan_fwd.cu`` (KERNEL_NOTES v10,
  launched by ``cuda_scan``; 4 lanes per channel, B/C rows in shared memory) replaces the
  Triton kernel below; the segment machinery (pass 1, combine, pass 2) serves both.
* forward, Triton (v7): one thread per channel, holding all N states of that channel and a chunk of
  T = 8 time steps in registers; a program is 32 * num_warps channels of one group. Per step
  and state: one exp2 and three FMA-class operations; the C contraction, softplus, D skip and
  z gate need no other lane. u, delta, z are read once (the next chunk's one iteration ahead),
  ``out`` written once. B and C are passed transposed, (B, G, L_pad + 1, NP) fp32, so a
  step's row of states is one broadcast load (read one step ahead, and pulled into L1 a chunk
  ahead). When batch x channels give too few warps to hide those loads, the sequence is cut
  into time segments scanned in parallel (pass 1: each segment's final state from zero and its
  sum of delta; a tiny combine kernel; pass 2: every segment from its true start state).
* the forward saves the state every 64 steps (B, n_ckpt, N, D) fp32.
* backward: on CUDA where NVRTC works, the CUDA C++ kernel of ``scan_bwd.cu`` (KERNEL_NOTES v9,
  launched by ``cuda_scan``) replaces the Triton kernel below, and ``scan_fwd.cu``'s
  ``ssm_adj_local`` the segment seeds' ``_adj_local_kernel`` (v10); the combine stays here.
* backward, Triton (v3): one program per (batch, block of channels) with 5-D work tiles
  (BL, NI, DW, NL, DL), state n = ni*NL + nl, channel d = dw*DL + dl; the in-chunk recurrence
  is a ``tl.associative_scan`` over the in-register time axis. It walks the checkpoint
  segments from the end, re-runs the forward inside a segment (start states of its chunks go
  to a small per-program scratch buffer), then runs the adjoint scan backwards chunk by chunk.
  dB, dC (reductions over channels) are summed per program and added with fp32 atomics; dA,
  dD, d(delta_bias) are per-(batch, channel) partials summed on the host.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from alignmamba.config import env_choice
from alignmamba.errors import AlignMambaError
from alignmamba.ssm import cuda_scan, nvrtc
from alignmamba.ssm.scan import _warn_once

__all__ = ["FwdConfig", "ScanConfig", "pick_bwd_segments", "pick_config", "pick_fwd_config",
           "pick_segments", "selective_scan_triton"]

ENV_FWD = "ALIGNMAMBA_SCAN_FWD"
ENV_BWD = "ALIGNMAMBA_SCAN_BWD"
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# ------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # composition of x -> a1 x + b1 then x -> a2 x + b2 (left element first in scan order)
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _log2(x, FAST: tl.constexpr):
    if FAST:
        # the MUFU instruction (rel. err ~2^-22); tl.log2 is a ~20-instruction polynomial
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _softplus(x, FAST: tl.constexpr):
    # max(x, 0) + log1p(exp(-|x|)); log1p by its series when tiny, where 1 + e rounds e away
    e = tl.exp2(-tl.abs(x) * 1.4426950408889634)
    lp = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), _log2(1.0 + e, FAST) * 0.6931471805599453)
    return tl.maximum(x, 0.0) + lp


@triton.jit
def _sigmoid(x):
    return tl.fdiv(1.0, 1.0 + tl.exp2(-x * 1.4426950408889634), ieee_rounding=False)


@triton.jit
def _pick_step(x, sel, AXIS: tl.constexpr = 0):
    # x[t] for the one t where sel holds, as a reduction over the in-register time axis AXIS
    # (a register pick); the filler is -0.0 (bit pattern 0x80000000) so that the compiler
    # folds the adds away
    neg_zero = tl.full(x.shape, 0x80000000, tl.uint32).to(tl.float32, bitcast=True)
    return tl.sum(tl.where(sel, x, neg_zero), axis=AXIS)


@triton.jit
def _to5(x):
    # (BL, DW, DL) per-(time, channel) tile -> (BL, 1, DW, 1, DL) for broadcasting over N
    return x[:, None, :, None, :]


@triton.jit
def _sum_n(x):
    # (BL, NI, DW, NL, DL) -> (BL, DW, DL). NL first: with the layout Triton picks (KERNEL_NOTES
    # v2) NL is in registers and NI on lanes, so the shuffles run on NL-times fewer values
    return tl.sum(tl.sum(x, axis=3), axis=1)


@triton.jit
def _sum_d(x):
    # (BL, NI, DW, NL, DL) -> (BL, NI, NL): lanes, then registers/warps
    return tl.sum(tl.sum(x, axis=4), axis=2)


@triton.jit
def _load_dt(dt_ptrs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
             FAST: tl.constexpr):
    """(raw delta + bias, delta after softplus), both zero where masked."""
    raw = tl.load(dt_ptrs, mask=mask, other=0.0).to(tl.float32)
    return _dt_of(raw, mask, bias, HAS_BIAS, SOFTPLUS, FAST)


@triton.jit
def _dt_of(raw, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
           FAST: tl.constexpr):
    """``_load_dt`` from an already loaded fp32 tile (the prefetching forward loads early)."""
    if HAS_BIAS:
        raw = raw + bias
    if SOFTPLUS:
        dt = _softplus(raw, FAST)
    else:
        dt = raw
    # masked steps must leave the state unchanged: delta' = 0 -> exp(0) = 1, no input
    return raw, tl.where(mask, dt, 0.0)


@triton.jit
def _prefetch_l1(ptrs):
    # pull the lines at ptrs into L1 (no register, no wait): PTX prefetch, CUDA only
    tl.inline_asm_elementwise("prefetch.global.L1 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _ssm_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    out_ptr, last_ptr, ckpt_ptr, dsum_ptr,
    L, N, Dg, n_blk_g, seg_len,
    s_ub, s_ud, s_ul,
    s_tb, s_td, s_tl,
    s_ad, s_an,
    s_bb, s_bg, s_bl,
    s_cb, s_cg, s_cl,
    s_zb, s_zd, s_zl,
    s_ob, s_od, s_ol,
    s_hb, s_hs, s_hd, s_hn,
    s_kb, s_kc, s_kn,
    s_sb, s_ss,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr, STORE_LAST: tl.constexpr,
    STORE_CKPT: tl.constexpr, STORE_OUT: tl.constexpr, STORE_DSUM: tl.constexpr,
    T: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, CK: tl.constexpr,
    FAST: tl.constexpr,
):
    """Forward over time segment ``program_id(2)`` ([seg * seg_len, +seg_len), seg_len a
    multiple of T * CK; one segment = the whole sequence) for BD channels of one group.

    Layout (KERNEL_NOTES v7): one thread per channel, holding that channel's NP states and a
    chunk of T time steps in registers: the (BD, T) stream tiles load as T contiguous steps
    per thread, and every (BD, NP) tile derived from them keeps one row per thread, so the
    C contraction over the states and softplus/gate per (t, d) need no other lane. The T
    steps of a chunk are unrolled: per step, one exp2 and three FMA-class operations per
    state. B and C come transposed and zero-padded, (B, G, L_pad, NP) fp32: one state row
    per step is a broadcast load, unmasked. The next chunk's u, delta, z are loaded one
    iteration ahead (register double buffering) so their DRAM latency overlaps this chunk.

    h0 / last are per (batch, segment) with segment stride s_hs (0 for one segment).
    STORE_OUT=False computes only the segment's final state (and, with STORE_DSUM,
    sum_t delta'_t per channel): pass 1 of the segment-parallel forward (``_fwd``)."""
    pid_blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2)
    l_beg = seg * seg_len
    l_end = tl.minimum(L, l_beg + seg_len)
    g = pid_blk // n_blk_g
    d_lo = g * Dg
    d_hi = d_lo + Dg

    dr = d_lo + (pid_blk % n_blk_g) * BD + tl.arange(0, BD)   # (BD,) channels
    nn = tl.arange(0, NP)                                    # (NP,) states
    d2 = dr[:, None]                                         # (BD, 1)
    dm2 = d2 < d_hi
    t2 = tl.arange(0, T)[None, :]                            # (1, T)
    n2 = nn[None, :]                                         # (1, NP)
    sm2 = dm2 & (n2 < N)                                     # (BD, NP)

    # A pre-scaled by log2(e) so that the discretisation is one exp2; padded states get
    # A = 0 and B = C = 0, so they stay at 0 and add nothing
    A2 = tl.load(A_ptr + d2 * s_ad + n2 * s_an, mask=sm2, other=0.0).to(tl.float32)
    A2 = A2 * 1.4426950408889634
    if HAS_BIAS:
        bias2 = tl.load(bias_ptr + d2, mask=dm2, other=0.0).to(tl.float32)
    else:
        bias2 = 0.0
    if HAS_D:
        Dv2 = tl.load(D_ptr + d2, mask=dm2, other=0.0).to(tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + b * s_hb + seg * s_hs + d2 * s_hd + n2 * s_hn, mask=sm2,
                    other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BD, NP), dtype=tl.float32)
    if STORE_DSUM:
        dsum = tl.zeros((BD,), dtype=tl.float32)

    u_ptrs = u_ptr + b * s_ub + d2 * s_ud + t2 * s_ul
    dt_ptrs = dt_ptr + b * s_tb + d2 * s_td + t2 * s_tl
    z_ptrs = z_ptr + b * s_zb + d2 * s_zd + t2 * s_zl
    o_ptrs = out_ptr + b * s_ob + d2 * s_od + t2 * s_ol
    B_row = B_ptr + b * s_bb + g * s_bg + nn
    C_row = C_ptr + b * s_cb + g * s_cg + nn
    l_pad = tl.cdiv(L, T) * T  # the padded B, C have l_pad + 1 rows
    tt = tl.arange(0, T)
    # checkpoint index is global: segments start on checkpoint boundaries
    k_ptrs = ckpt_ptr + b * s_kb + n2 * s_kn + d2 + (l_beg // (T * CK)) * s_kc

    # chunk 0's streams and first B, C rows; iteration c loads chunk c+1's streams before
    # computing chunk c, and step t loads the rows of step t+1 (the last step: the next
    # chunk's first rows; the padded B, C have a row past the last chunk for that)
    pm = ((l_beg + t2) < l_end) & dm2
    u_nx = tl.load(u_ptrs + l_beg * s_ul, mask=pm, other=0.0)
    dt_nx = tl.load(dt_ptrs + l_beg * s_tl, mask=pm, other=0.0)
    if STORE_OUT and HAS_Z:
        z_nx = tl.load(z_ptrs + l_beg * s_zl, mask=pm, other=0.0)
    B_nx = tl.load(B_row + l_beg * s_bl)
    if STORE_OUT:
        C_nx = tl.load(C_row + l_beg * s_cl)
    n_chunks = tl.cdiv(l_end - l_beg, T)
    for c in range(n_chunks):
        l0 = l_beg + c * T
        tm2 = ((l0 + t2) < l_end) & dm2
        u = u_nx.to(tl.float32)
        raw = dt_nx.to(tl.float32)
        if STORE_OUT and HAS_Z:
            zv = z_nx.to(tl.float32)
        # masked off after the last chunk
        pm = ((l0 + T + t2) < l_end) & dm2
        u_nx = tl.load(u_ptrs + (l0 + T) * s_ul, mask=pm, other=0.0)
        dt_nx = tl.load(dt_ptrs + (l0 + T) * s_tl, mask=pm, other=0.0)
        if STORE_OUT and HAS_Z:
            z_nx = tl.load(z_ptrs + (l0 + T) * s_zl, mask=pm, other=0.0)
        if FAST:
            # the next chunk's B, C rows into L1 now, so that the row loads one step ahead
            # hit L1 (KERNEL_NOTES v7, runs 4-6)
            rows = tl.minimum(l0 + T + tt, l_pad)
            _prefetch_l1(B_ptr + b * s_bb + g * s_bg + rows * s_bl)
            if STORE_OUT:
                _prefetch_l1(C_ptr + b * s_cb + g * s_cg + rows * s_cl)
        _, dt = _dt_of(raw, tm2, bias2, HAS_BIAS, SOFTPLUS, FAST)  # 0 on masked steps
        if STORE_CKPT and (c % CK == 0):
            tl.store(k_ptrs + (c // CK) * s_kc, h, mask=sm2)
        if STORE_DSUM:
            dsum += tl.sum(dt, axis=1)
        dtu = dt * u
        y = tl.zeros((BD, T), dtype=tl.float32)
        for t in tl.static_range(T):
            sel = t2 == t
            Bt = B_nx
            B_nx = tl.load(B_row + (l0 + t + 1) * s_bl)
            if STORE_OUT:
                Ct = C_nx
                C_nx = tl.load(C_row + (l0 + t + 1) * s_cl)
            dA = tl.exp2(_pick_step(dt, sel, 1)[:, None] * A2)
            h = dA * h + _pick_step(dtu, sel, 1)[:, None] * Bt[None, :]
            if STORE_OUT:
                y = tl.where(sel, tl.sum(h * Ct[None, :], axis=1)[:, None], y)
        if STORE_OUT:
            if HAS_D:
                y += Dv2 * u
            if HAS_Z:
                y = y * zv * _sigmoid(zv)
            tl.store(o_ptrs + l0 * s_ol, y, mask=tm2)

    if STORE_LAST:
        tl.store(last_ptr + b * s_hb + seg * s_hs + d2 * s_hd + n2 * s_hn, h, mask=sm2)
    if STORE_DSUM:
        tl.store(dsum_ptr + b * s_sb + seg * s_ss + dr, dsum, mask=dr < d_hi)


@triton.jit
def _seg_combine_kernel(last_ptr, dsum_ptr, A_ptr, h0_ptr, start_ptr, final_ptr,
                        S, DN, N, HAS_H0: tl.constexpr, BLOCK: tl.constexpr,
                        REVERSE: tl.constexpr = False):
    """Second pass of the segment-parallel forward, for one batch row and BLOCK (d, n) pairs:
    start_s = exp(A sum(delta' over segment s-1)) start_{s-1} + local_{s-1}, start_0 = h0,
    where local_s is segment s's final state from a zero start. Also writes the sequence's
    final state. last/start: (B, S, D, N), dsum: (B, S, D), h0/final: (B, D, N), contiguous.

    REVERSE (the segment-parallel backward): the same recurrence over segments S-1 .. 0, with
    local = each segment's adjoint at its first step from a zero seed, dsum = its sum of delta
    shifted by one step, h0 = dlast: start_s is then the adjoint seed past segment s's end.
    Nothing is written to final."""
    b = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < DN
    d = i // N
    a = tl.load(A_ptr + i, mask=m, other=0.0).to(tl.float32) * 1.4426950408889634
    if HAS_H0:
        h = tl.load(h0_ptr + b * DN + i, mask=m, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(S):
        if REVERSE:
            s = S - 1 - k
        else:
            s = k
        tl.store(start_ptr + (b * S + s) * DN + i, h, mask=m)
        ds = tl.load(dsum_ptr + (b * S + s) * (DN // N) + d, mask=m, other=0.0)
        loc = tl.load(last_ptr + (b * S + s) * DN + i, mask=m, other=0.0)
        h = tl.exp2(a * ds) * h + loc
    if not REVERSE:
        tl.store(final_ptr + b * DN + i, h, mask=m)


@triton.jit
def _adj_local_kernel(
    dt_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dout_ptr, local_ptr, dsum_ptr,
    L, N, Dg, n_blk_g, seg_len,
    s_tb, s_td, s_tl,
    s_ad, s_an,
    s_cb, s_cg, s_cl,
    s_zb, s_zd, s_zl,
    s_gb, s_gd, s_gl,
    s_hb, s_hs, s_hd, s_hn,
    s_sb, s_ss,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    T: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, FAST: tl.constexpr,
):
    """Pass 1 of the segment-parallel backward (KERNEL_NOTES v8), the forward kernel's layout
    (one thread per channel, all states in registers) walking time backwards. For segment
    ``program_id(2)`` = [l_beg, l_end): its adjoint at l_beg from a zero seed past l_end,

        sigma = sum_{t in seg} (prod_{l_beg < t' <= t} exp(delta_t' A)) C_t dy_t,

    dy = dout (times silu(z) with a gate), and sum(delta_t', l_beg < t' <= l_end) with
    delta_L = 0, so that s_{l_beg} = sigma + exp(A dsum) s_{l_end}. C is the forward's padded
    (B, G, L_pad + 1, NP) copy. local: (B, S, D, N); dsum: (B, S, D)."""
    pid_blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2)
    l_beg = seg * seg_len
    l_end = tl.minimum(L, l_beg + seg_len)
    g = pid_blk // n_blk_g
    d_lo = g * Dg
    d_hi = d_lo + Dg
    dr = d_lo + (pid_blk % n_blk_g) * BD + tl.arange(0, BD)
    nn = tl.arange(0, NP)
    d2 = dr[:, None]
    dm2 = d2 < d_hi
    t2 = tl.arange(0, T)[None, :]
    n2 = nn[None, :]
    sm2 = dm2 & (n2 < N)
    A2 = tl.load(A_ptr + d2 * s_ad + n2 * s_an, mask=sm2, other=0.0).to(tl.float32)
    A2 = A2 * 1.4426950408889634
    if HAS_BIAS:
        bias2 = tl.load(bias_ptr + d2, mask=dm2, other=0.0).to(tl.float32)
    else:
        bias2 = 0.0
    s = tl.zeros((BD, NP), dtype=tl.float32)
    dsum = tl.zeros((BD,), dtype=tl.float32)
    dt_ptrs = dt_ptr + b * s_tb + d2 * s_td + t2 * s_tl
    z_ptrs = z_ptr + b * s_zb + d2 * s_zd + t2 * s_zl
    g_ptrs = dout_ptr + b * s_gb + d2 * s_gd + t2 * s_gl
    C_row = C_ptr + b * s_cb + g * s_cg + nn
    n_chunks = tl.cdiv(l_end - l_beg, T)
    for cr in range(n_chunks):
        l0 = l_beg + (n_chunks - 1 - cr) * T
        tm2 = ((l0 + t2) < l_end) & dm2
        dy = tl.load(g_ptrs + l0 * s_gl, mask=tm2, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_ptrs + l0 * s_zl, mask=tm2, other=0.0).to(tl.float32)
            dy = dy * zv * _sigmoid(zv)
        # delta at t + 1 (0 past the sequence, and on padded steps)
        nm2 = tm2 & ((l0 + 1 + t2) < L)
        raw = tl.load(dt_ptrs + (l0 + 1) * s_tl, mask=nm2, other=0.0).to(tl.float32)
        _, dtn = _dt_of(raw, nm2, bias2, HAS_BIAS, SOFTPLUS, FAST)
        dsum += tl.sum(dtn, axis=1)
        for tr in tl.static_range(T):
            sel = t2 == (T - 1 - tr)
            Ct = tl.load(C_row + (l0 + T - 1 - tr) * s_cl)
            s = (tl.exp2(_pick_step(dtn, sel, 1)[:, None] * A2) * s
                 + _pick_step(dy, sel, 1)[:, None] * Ct[None, :])
    tl.store(local_ptr + b * s_hb + seg * s_hs + d2 * s_hd + n2 * s_hn, s, mask=sm2)
    tl.store(dsum_ptr + b * s_sb + seg * s_ss + dr, dsum, mask=dr < d_hi)


@triton.jit
def _ssm_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, dlast_ptr, ckpt_ptr,
    scr_ptr,
    du_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    L, N, Dg, n_blk_g, Dtot, ck_per_seg,
    s_ub, s_ud, s_ul,
    s_tb, s_td, s_tl,
    s_ad, s_an,
    s_bb, s_bg, s_bn, s_bl,
    s_cb, s_cg, s_cn, s_cl,
    s_zb, s_zd, s_zl,
    s_gb, s_gd, s_gl,
    s_hb, s_hd, s_hn,
    s_kb, s_kc, s_kn,
    s_xb, s_xd, s_xl,
    s_eb, s_eg, s_en, s_el,
    s_pb,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr, HAS_DLAST: tl.constexpr,
    BL: tl.constexpr, NI: tl.constexpr, NL: tl.constexpr, DW: tl.constexpr, DL: tl.constexpr,
    CK: tl.constexpr, FAST: tl.constexpr,
):
    """Adjoint of the forward. With s_t = dL/dh_t and g_t = dL/dy_t:

    s_t = C_t g_t + exp(delta_{t+1} A) s_{t+1}   (reverse scan, seeded with dlast)
    dA += delta_t s_t e_t, e_t = h_t - delta_t B_t u_t = exp(delta_t A) h_{t-1}
    ddelta_t = sum_n (A s_t e_t + s_t B_t u_t);  du_t = delta_t sum_n s_t B_t + D g_t
    dB_t = sum_d s_t delta_t u_t;  dC_t = sum_d g_t h_t.
    du, ddelta, dz share the (B, D, L) strides s_x*; dB, dC the (B, G, N, L) strides s_e*.

    Time segment ``program_id(2)`` of S (KERNEL_NOTES v8) covers ``ck_per_seg`` checkpoint
    segments; its adjoint seed s_{t_end} comes from dlast viewed as (B, S, D, N) (the
    combined seeds of ``_bwd``; the sequence's dlast when S = 1). dA, dD, d(delta_bias) are
    partials per (batch, segment) row b * S + seg; only segment 0 writes dh0.
    """
    pid_blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tseg = tl.program_id(2)
    bs = b * tl.num_programs(2) + tseg  # row of the per-(batch, segment) seeds and partials
    g = pid_blk // n_blk_g
    d_lo = g * Dg
    d0 = d_lo + (pid_blk % n_blk_g) * (DW * DL)
    d_hi = d_lo + Dg

    t3 = tl.arange(0, BL)[:, None, None]
    d3 = d0 + tl.arange(0, DW)[None, :, None] * DL + tl.arange(0, DL)[None, None, :]
    dm3 = d3 < d_hi
    t5 = tl.arange(0, BL)[:, None, None, None, None]
    n5 = tl.arange(0, NI)[None, :, None, None, None] * NL + tl.arange(0, NL)[None, None, None, :, None]
    d5 = (d0 + tl.arange(0, DW)[None, None, :, None, None] * DL
          + tl.arange(0, DL)[None, None, None, None, :])
    nm5 = n5 < N
    n4 = tl.arange(0, NI)[:, None, None, None] * NL + tl.arange(0, NL)[None, None, :, None]
    dl4 = tl.arange(0, DW)[None, :, None, None] * DL + tl.arange(0, DL)[None, None, None, :]
    d4 = d0 + dl4
    sm4 = (n4 < N) & (d4 < d_hi)
    # (time, state) tiles for dB, dC: (BL, NI, NL)
    tq = tl.arange(0, BL)[:, None, None]
    nq = tl.arange(0, NI)[None, :, None] * NL + tl.arange(0, NL)[None, None, :]

    A5 = tl.load(A_ptr + d5 * s_ad + n5 * s_an, mask=nm5 & (d5 < d_hi), other=0.0).to(tl.float32)
    A5 = A5 * 1.4426950408889634
    if HAS_BIAS:
        bias3 = tl.load(bias_ptr + d3, mask=dm3, other=0.0).to(tl.float32)
    else:
        bias3 = 0.0
    if HAS_D:
        Dv3 = tl.load(D_ptr + d3, mask=dm3, other=0.0).to(tl.float32)
    if HAS_DLAST:
        s = tl.load(dlast_ptr + bs * s_hb + d4 * s_hd + n4 * s_hn, mask=sm4, other=0.0)
        s = s.to(tl.float32)
    else:
        s = tl.zeros((NI, DW, NL, DL), dtype=tl.float32)
    dA_acc = tl.zeros((NI, DW, NL, DL), dtype=tl.float32)
    dh0 = tl.zeros((NI, DW, NL, DL), dtype=tl.float32)
    dD_acc = tl.zeros((DW, DL), dtype=tl.float32)
    dbias_acc = tl.zeros((DW, DL), dtype=tl.float32)

    u_ptrs = u_ptr + b * s_ub + d3 * s_ud + t3 * s_ul
    dt_ptrs = dt_ptr + b * s_tb + d3 * s_td + t3 * s_tl
    z_ptrs = z_ptr + b * s_zb + d3 * s_zd + t3 * s_zl
    g_ptrs = dout_ptr + b * s_gb + d3 * s_gd + t3 * s_gl
    x_off = b * s_xb + d3 * s_xd + t3 * s_xl
    B_ptrs = B_ptr + b * s_bb + g * s_bg + n5 * s_bn + t5 * s_bl
    C_ptrs = C_ptr + b * s_cb + g * s_cg + n5 * s_cn + t5 * s_cl
    e_off = b * s_eb + g * s_eg + nq * s_en + tq * s_el
    k_ptrs = ckpt_ptr + b * s_kb + n4 * s_kn + d4
    # per-program scratch for the chunk-start states of one segment: (CK, NP, BD)
    pid_lin = (tseg * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + pid_blk
    scr_ptrs = scr_ptr + pid_lin.to(tl.int64) * s_pb + n4 * (DW * DL) + dl4

    n_chunks = tl.cdiv(L, BL)
    ck_lo = tseg * ck_per_seg
    ck_hi = tl.minimum(tl.cdiv(n_chunks, CK), ck_lo + ck_per_seg)
    for seg_r in range(ck_hi - ck_lo):
        seg = ck_hi - 1 - seg_r
        h = tl.load(k_ptrs + seg * s_kc, mask=sm4, other=0.0)
        if CK > 1:
            # re-run the forward over the segment to get each chunk's start state
            for k in range(CK):
                tl.store(scr_ptrs + k * (NI * NL * DW * DL), h)
                if k < CK - 1:
                    l0 = (seg * CK + k) * BL
                    tm3 = ((l0 + t3) < L) & dm3
                    tm5 = ((l0 + t5) < L) & nm5
                    u = tl.load(u_ptrs + l0 * s_ul, mask=tm3, other=0.0).to(tl.float32)
                    _, dt = _load_dt(dt_ptrs + l0 * s_tl, tm3, bias3, HAS_BIAS, SOFTPLUS, FAST)
                    Bt = tl.load(B_ptrs + l0 * s_bl, mask=tm5, other=0.0).to(tl.float32)
                    dA = tl.exp2(_to5(dt) * A5)
                    dBu = _to5(dt * u) * Bt
                    dBu = tl.where(t5 == 0, dBu + dA * h[None, :, :, :, :], dBu)
                    _, hh = tl.associative_scan((dA, dBu), 0, _affine_combine)
                    h = _pick_step(hh, t5 == BL - 1)
            # the same threads read back what they wrote, but keep the order explicit
            tl.debug_barrier()
        for k_r in range(CK):
            k = CK - 1 - k_r
            if CK > 1:
                h = tl.load(scr_ptrs + k * (NI * NL * DW * DL))
            l0 = (seg * CK + k) * BL
            tm3 = ((l0 + t3) < L) & dm3
            tm5 = ((l0 + t5) < L) & nm5
            u = tl.load(u_ptrs + l0 * s_ul, mask=tm3, other=0.0).to(tl.float32)
            raw, dt = _load_dt(dt_ptrs + l0 * s_tl, tm3, bias3, HAS_BIAS, SOFTPLUS, FAST)
            # delta at t+1 (0 past the end) for the adjoint's transition
            tn3 = ((l0 + 1 + t3) < L) & dm3
            _, dtn = _load_dt(dt_ptrs + (l0 + 1) * s_tl, tn3, bias3, HAS_BIAS, SOFTPLUS, FAST)
            dy = tl.load(g_ptrs + l0 * s_gl, mask=tm3, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptrs + l0 * s_bl, mask=tm5, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptrs + l0 * s_cl, mask=tm5, other=0.0).to(tl.float32)

            # forward states of this chunk
            dt5 = _to5(dt)
            dA = tl.exp2(dt5 * A5)
            dtu = dt * u
            dBu = _to5(dtu) * Bt
            dBu_in = tl.where(t5 == 0, dBu + dA * h[None, :, :, :, :], dBu)
            _, hh = tl.associative_scan((dA, dBu_in), 0, _affine_combine)

            if HAS_Z:
                zv = tl.load(z_ptrs + l0 * s_zl, mask=tm3, other=0.0).to(tl.float32)
                y = _sum_n(hh * Ct)
                if HAS_D:
                    y += Dv3 * u
                sz = _sigmoid(zv)
                dzv = dy * y * sz * (1.0 + zv * (1.0 - sz))
                tl.store(dz_ptr + x_off + l0 * s_xl, dzv, mask=tm3)
                dy = dy * zv * sz

            # adjoint states: reverse scan seeded with the next chunk's s
            a2 = tl.exp2(_to5(dtn) * A5)
            bc = Ct * _to5(dy)
            bc = tl.where(t5 == BL - 1, bc + a2 * s[None, :, :, :, :], bc)
            _, ss = tl.associative_scan((a2, bc), 0, _affine_combine, reverse=True)
            s = _pick_step(ss, t5 == 0)
            if HAS_H0:
                # dL/dh_{-1} = exp(delta_0 A) s_0; only chunk 0's value survives
                dh0 = _pick_step(dA * ss, t5 == 0)

            sf = ss * (hh - dBu)
            dA_acc += tl.sum(dt5 * sf, axis=0)
            sB = _sum_n(ss * Bt)
            Af = _sum_n(sf * A5) * 0.6931471805599453
            ddt = Af + u * sB
            if SOFTPLUS:
                ddt = ddt * _sigmoid(raw)
            ddt = tl.where(tm3, ddt, 0.0)
            du = dt * sB
            if HAS_D:
                du += Dv3 * dy
                dD_acc += tl.sum(dy * u, axis=0)
            if HAS_BIAS:
                dbias_acc += tl.sum(ddt, axis=0)
            tl.store(du_ptr + x_off + l0 * s_xl, du, mask=tm3)
            tl.store(ddt_ptr + x_off + l0 * s_xl, ddt, mask=tm3)

            tmq = ((l0 + tq) < L) & (nq < N)
            dBv = _sum_d(ss * _to5(dtu))
            tl.atomic_add(dB_ptr + e_off + l0 * s_el, dBv, mask=tmq, sem="relaxed")
            dCv = _sum_d(hh * _to5(dy))
            tl.atomic_add(dC_ptr + e_off + l0 * s_el, dCv, mask=tmq, sem="relaxed")

    tl.store(dA_ptr + bs * s_hb + d4 * s_hd + n4 * s_hn, dA_acc, mask=sm4)
    if HAS_H0:  # noqa: SIM102 (compile-time flag outside, runtime test inside)
        if tseg == 0:
            tl.store(dh0_ptr + b * s_hb + d4 * s_hd + n4 * s_hn, dh0, mask=sm4)
    dq = d0 + tl.arange(0, DW)[:, None] * DL + tl.arange(0, DL)[None, :]
    q_off = bs * Dtot + dq
    if HAS_D:
        tl.store(dD_ptr + q_off, dD_acc, mask=dq < d_hi)
    if HAS_BIAS:
        tl.store(dbias_ptr + q_off, dbias_acc, mask=dq < d_hi)


# ------------------------------------------------------------------------------------------
# launch configuration
# ------------------------------------------------------------------------------------------


class ScanConfig:
    """Tile shape of one program: BL time steps x (NI*NL) states x (DW*DL) channels.

    NL*DL should be 32 (one warp's lanes) and DW a multiple of num_warps for the intended
    layout (see the module docstring); any powers of two are *correct*. CK is the number
    of chunks between saved states (checkpoint every BL*CK steps).
    """

    __slots__ = ("BL", "CK", "DL", "DW", "NI", "NL", "num_warps")

    def __init__(self, BL: int, NI: int, NL: int, DW: int, DL: int, CK: int, num_warps: int):
        for name, v in (("BL", BL), ("NI", NI), ("NL", NL), ("DW", DW), ("DL", DL)):
            if v < 1 or v & (v - 1):
                raise AlignMambaError(f"selective_scan_triton: config {name}={v} must be a power of 2")
        if CK < 1 or num_warps < 1:
            raise AlignMambaError("selective_scan_triton: config CK and num_warps must be >= 1")
        self.BL, self.NI, self.NL, self.DW, self.DL = BL, NI, NL, DW, DL
        self.CK, self.num_warps = CK, num_warps

    @property
    def block_d(self) -> int:
        return self.DW * self.DL

    def meta(self) -> dict:
        return {"BL": self.BL, "NI": self.NI, "NL": self.NL, "DW": self.DW, "DL": self.DL,
                "CK": self.CK}

    def __repr__(self) -> str:
        return (f"ScanConfig(BL={self.BL}, NI={self.NI}, NL={self.NL}, DW={self.DW}, "
                f"DL={self.DL}, CK={self.CK}, num_warps={self.num_warps})")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_ceil(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def pick_config(
    dstate: int, group_dim: int, backward: bool = False, block_l: int | None = None,
    chunks_per_ckpt: int | None = None,
) -> ScanConfig:
    """Default tile for N = ``dstate`` and ``group_dim`` = D / G channels per group.

    Lanes: NL = min(4, N) over states, DL = 32 / NL over channels; warps over channels, each
    thread holding ``reg_d`` channels (forward and backward alike: the measured best on H100). BL = 4 keeps the per-thread tiles (BL*NI*reg_d values)
    in registers; CK = 16 checkpoints the state every 64 steps (64 B per step and channel-state
    pair would otherwise be written and read: see docs/KERNEL_NOTES.md).
    """
    np2 = _pow2_ceil(dstate)
    NL = min(4, np2)
    NI = np2 // NL
    DL = 32 // NL
    reg_d = 4  # backward: 4 measured 37 ms vs 56 ms for 2 (KERNEL_NOTES, run 1)
    num_warps = 4
    want = max(1, _pow2_ceil(-(-group_dim // DL)))
    DW = min(num_warps * reg_d, want)
    num_warps = max(1, min(num_warps, DW))
    BL = block_l if block_l is not None else 4
    CK = chunks_per_ckpt if chunks_per_ckpt is not None else max(1, 64 // BL)
    return ScanConfig(BL=BL, NI=NI, NL=NL, DW=DW, DL=DL, CK=CK, num_warps=num_warps)


class FwdConfig:
    """Tile of one forward program (KERNEL_NOTES v7): BD = 32 * num_warps channels, one per
    thread, each with all its states; T time steps per chunk (a power of 2); the state is
    saved every T * CK steps (must equal the backward's BL * CK)."""

    __slots__ = ("CK", "T", "num_warps")

    def __init__(self, T: int, CK: int, num_warps: int):
        for name, v in (("T", T), ("num_warps", num_warps)):
            if v < 1 or v & (v - 1):
                raise AlignMambaError(f"selective_scan_triton: config {name}={v} must be a power of 2")
        if CK < 1:
            raise AlignMambaError("selective_scan_triton: config CK must be >= 1")
        self.T, self.CK, self.num_warps = T, CK, num_warps

    @property
    def block_d(self) -> int:
        return 32 * self.num_warps

    def meta(self) -> dict:
        return {"T": self.T, "BD": self.block_d, "CK": self.CK}

    def __repr__(self) -> str:
        return f"FwdConfig(T={self.T}, CK={self.CK}, num_warps={self.num_warps})"


def pick_fwd_config(group_dim: int, block_l: int | None = None,
                    chunks_per_ckpt: int | None = None) -> FwdConfig:
    """Default forward tile: T = 8 steps per chunk (one 16-byte load per bf16 stream and
    thread), 4 warps = 128 channels per program (fewer when a group has fewer channels),
    checkpoints every 64 steps as the backward expects."""
    T = block_l if block_l is not None else 8
    CK = chunks_per_ckpt if chunks_per_ckpt is not None else max(1, 64 // T)
    num_warps = max(1, min(4, _pow2_ceil(_cdiv(group_dim, 32))))
    return FwdConfig(T, CK, num_warps)


# ------------------------------------------------------------------------------------------
# argument checks and launches
# ------------------------------------------------------------------------------------------


def _check(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
           z: Tensor | None, delta_bias: Tensor | None,
           initial_state: Tensor | None) -> tuple[Tensor, Tensor, int]:
    """Validate shapes; return B, C as (B, G, N, L) views and G."""
    def fail(msg: str) -> None:
        raise AlignMambaError(f"selective_scan_triton: {msg}")

    if u.dim() != 3:
        fail(f"u must be (B, D, L), got shape {tuple(u.shape)}")
    bsz, dim, length = u.shape
    if delta.shape != u.shape:
        fail(f"delta must match u {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.is_complex() or A.dim() != 2 or A.shape[0] != dim:
        fail(f"A must be real (D, N) with D={dim}, got {tuple(A.shape)} {A.dtype}")
    dstate = A.shape[1]
    views = []
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            t = t.unsqueeze(1)
        if t.dim() != 4 or t.shape[0] != bsz or t.shape[2] != dstate or t.shape[3] != length:
            fail(f"{name} must be (B, N, L) or (B, G, N, L) with B={bsz}, N={dstate}, "
                 f"L={length}; got {tuple(t.shape)} (input-independent B/C are not supported)")
        if t.is_complex():
            fail(f"{name} must be real")
        views.append(t)
    Bg, Cg = views
    groups = Bg.shape[1]
    if Cg.shape[1] != groups or groups < 1 or dim % groups:
        fail(f"B and C need the same number of groups G dividing D={dim}; "
             f"got {Bg.shape[1]} and {Cg.shape[1]}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            fail(f"{name} must be ({dim},), got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        fail(f"z must match u {tuple(u.shape)}, got {tuple(z.shape)}")
    if initial_state is not None and initial_state.shape != (bsz, dim, dstate):
        fail(f"initial_state must be (B, D, N)=({bsz}, {dim}, {dstate}), "
             f"got {tuple(initial_state.shape)}")
    devs = {t.device for t in (u, delta, A, Bg, Cg, D, z, delta_bias, initial_state)
            if t is not None}
    if len(devs) != 1:
        fail(f"all tensors must be on one device, got {sorted(map(str, devs))}")
    return Bg, Cg, groups


def _lastdim_contig(t: Tensor | None) -> Tensor | None:
    # loads along time are vectorised only when time is the contiguous axis
    if t is None:
        return None
    return t if t.stride(-1) == 1 else t.contiguous()


def _prep_bc(t: Tensor) -> Tensor:
    """B or C for the backward: fp32 with contiguous time, (B, G, N, L). It is N*D times
    smaller than the (B, D, L) streams, so converting it once costs ~1% extra traffic and
    saves every program from unpacking bf16 for its own copy of the tile (KERNEL_NOTES v3)."""
    return _lastdim_contig(t.to(torch.float32))


def _rows_bc(t: Tensor, T: int) -> Tensor:
    """B or C for the forward (KERNEL_NOTES v7): (B, G, L_pad + 1, NP) fp32, one row of states
    per step, zero-padded to a whole number of T-step chunks plus one row (read ahead by the
    last step) and to NP = next power of 2 >= N, so the kernel's row loads need no mask."""
    bsz, groups, dstate, length = t.shape
    out = torch.zeros(bsz, groups, _cdiv(length, T) * T + 1, _pow2_ceil(dstate),
                      device=t.device, dtype=torch.float32)
    out[:, :, :length, :dstate] = t.transpose(-1, -2)
    return out


def _fast_math() -> bool:
    """PTX fast paths (inline asm) unless Triton's CPU interpreter runs the kernels."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True")


def _grid(bsz: int, dim: int, groups: int, cfg: ScanConfig) -> tuple[tuple[int, int], int]:
    dg = dim // groups
    n_blk_g = -(-dg // cfg.block_d)
    return (groups * n_blk_g, bsz), n_blk_g


def _segments_for(units: int, per_sm: int, min_steps: int, length: int,
                  device: torch.device) -> int:
    """The segment rule of both passes: ``units`` (warps or programs) walk time sequentially;
    when they fill less than a quarter of ``per_sm`` per SM, cut time into enough segments to
    reach it, each at least ``min_steps`` long (1 = no cut; always 1 off CUDA)."""
    if device.type != "cuda":
        return 1
    target = per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    if 4 * units > target:
        return 1
    return max(1, min(_cdiv(target, units), length // min_steps))


# Segment-parallel forward: each warp walks its 32 channels through the whole sequence and
# stalls on every step's loads, so it needs many warps per SM to run at speed (batch 1, D 512:
# 16 warps for 132 SMs). When batch x channels give fewer than a quarter of SEG_WARPS_PER_SM
# warps per SM, the sequence is cut into segments scanned in parallel (two passes: ~1.9x the
# work), enough to reach SEG_WARPS_PER_SM, each at least MIN_SEG_STEPS long. (Sweeps on the
# H100: docs/KERNEL_NOTES.md, v7.)
SEG_WARPS_PER_SM = 48
MIN_SEG_STEPS = 128


def pick_segments(bsz: int, dim: int, groups: int, length: int, cfg: FwdConfig,
                  device: torch.device) -> int:
    """How many time segments the forward runs in parallel (1 = the plain single pass)."""
    warps = _grid(bsz, dim, groups, cfg)[0][0] * bsz * cfg.num_warps
    return _segments_for(warps, SEG_WARPS_PER_SM, MIN_SEG_STEPS, length, device)


# Segment-parallel backward (KERNEL_NOTES v8): the backward kernel walks time sequentially
# per (batch, channel block) program too; when those programs fill less than a quarter of
# BWD_PROGRAMS_PER_SM per SM, time is cut into segments of whole checkpoint segments, at least
# BWD_MIN_SEG_STEPS long. (Sweeps on the H100: docs/KERNEL_NOTES.md, v8.)
BWD_PROGRAMS_PER_SM = 8
BWD_MIN_SEG_STEPS = 256


def pick_bwd_segments(bsz: int, dim: int, groups: int, length: int, cfg: ScanConfig,
                      device: torch.device) -> int:
    """How many time segments the backward runs in parallel (1 = one sequential walk)."""
    progs = _grid(bsz, dim, groups, cfg)[0][0] * bsz
    return _segments_for(progs, BWD_PROGRAMS_PER_SM, BWD_MIN_SEG_STEPS, length, device)


def _launch_fwd(u, delta, At, Bf, Cf, D, z, delta_bias, h0, out, last, ckpt, dsum, segments,
                seg_len, softplus, cfg: FwdConfig, store_out: bool):
    bsz, dim, length = u.shape
    groups = Bf.shape[1]
    (gx, _), n_blk_g = _grid(bsz, dim, groups, cfg)
    dummy = u  # never read when the matching flag is off
    hs = h0 if h0 is not None else last
    if hs is None:
        h_strides = (0, 0, 0, 0)
    elif hs.dim() == 4:  # (B, S, D, N): one state per segment
        h_strides = hs.stride()
    else:
        h_strides = (hs.stride(0), 0, hs.stride(1), hs.stride(2))
    zs = z if z is not None else u
    os_ = out if out is not None else u
    ks = ckpt if ckpt is not None else torch.empty(1, 1, 1, device=u.device)
    _ssm_fwd_kernel[(gx, bsz, segments)](
        u, delta, At, Bf, Cf,
        D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy,
        h0 if h0 is not None else dummy,
        out if out is not None else dummy, last if last is not None else dummy, ks,
        dsum if dsum is not None else dummy,
        length, At.shape[0], dim // groups, n_blk_g, seg_len,
        *u.stride(), *delta.stride(), At.stride(1), At.stride(0), *Bf.stride()[:3],
        *Cf.stride()[:3], *zs.stride(), *os_.stride(),
        *h_strides,
        ks.stride(0), ks.stride(1), ks.stride(2),
        *(dsum.stride()[:2] if dsum is not None else (0, 0)),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(softplus), HAS_H0=h0 is not None, STORE_LAST=last is not None,
        STORE_CKPT=ckpt is not None, STORE_OUT=store_out, STORE_DSUM=dsum is not None,
        NP=Bf.shape[3], FAST=_fast_math(), num_warps=cfg.num_warps, **cfg.meta(),
    )


def _fwd(u, delta, A, Bg, Cg, D, z, delta_bias, h0, softplus, store_last, store_ckpt,
         cfg: FwdConfig, segments: int | None = None, kernel: str = "triton",
         options: tuple[str, ...] = ()):
    """Forward launches; Bg, Cg (B, G, N, L). ``kernel``: "cuda"/"cuda-auto" (``scan_fwd.cu``,
    KERNEL_NOTES v10; "cuda-auto" falls back to Triton with a one-time warning if NVRTC fails)
    or "triton" (``_ssm_fwd_kernel``, v7). ``segments`` > 1: three passes (local final states
    and delta sums per segment; the sequential combination of those S states, a tiny kernel;
    the full forward of every segment from its true start state); None: the picker of the
    kernel that runs. Same results as one pass up to fp32 rounding (the start states are
    composed in another order). ``options``: compile-time settings of the CUDA kernel
    (``cuda_scan.selective_scan_fwd_cuda``; benchmarks), and "BC16=0": bf16 B and C as fp32
    rows instead of packed (same results)."""
    bsz, dim, length = u.shape
    groups, dstate = Bg.shape[1], A.shape[1]
    f32 = torch.float32
    dev = u.device
    seg_arg = segments
    cuda = kernel in ("cuda", "cuda-auto")
    if cuda:
        u, delta = u.contiguous(), delta.contiguous()
        z = z.contiguous() if z is not None else None
        # bf16 B and C travel packed (the BC16 build, exact); "BC16=0" in options keeps the
        # fp32 rows (benchmarks compare the two)
        for opt in options:
            if opt.startswith("BC16=") and opt not in ("BC16=0", "BC16=1"):
                raise ValueError(f"scan_fwd.cu option {opt!r}: BC16=0 or BC16=1 expected")
        bc16 = Bg.dtype == Cg.dtype == torch.bfloat16 and "BC16=0" not in options
        options = tuple(o for o in options if not o.startswith("BC16="))
        Br, Cr = ((cuda_scan.rows_bc16(Bg, Cg), None) if bc16
                  else (cuda_scan.rows16(Bg), cuda_scan.rows16(Cg)))

        def launch(h0_, out_, last_, ckpt_, dsum_, S, seg_len):
            cuda_scan.selective_scan_fwd_cuda(u, delta, A, Br, Cr, D, z, delta_bias, h0_,
                                              softplus, out_, last_, ckpt_, dsum_, S, seg_len,
                                              options)
    else:
        # A as (N, D): the kernel reads it once per program, any layout is fine
        At = A.t().contiguous()
        Bf, Cf = _rows_bc(Bg, cfg.T), _rows_bc(Cg, cfg.T)

        def launch(h0_, out_, last_, ckpt_, dsum_, S, seg_len):
            _launch_fwd(u, delta, At, Bf, Cf, D, z, delta_bias, h0_, out_, last_, ckpt_, dsum_,
                        S, seg_len, softplus, cfg, out_ is not None)
    step = cfg.T * cfg.CK  # checkpoint spacing; segments start on checkpoint boundaries
    if cuda:
        step = cuda_scan.SEG  # the CUDA kernel's segments are whole 64-step checkpoints
    if segments is None:
        segments = (cuda_scan.pick_fwd_segments(bsz, dim, groups, length, dev) if cuda
                    else pick_segments(bsz, dim, groups, length, cfg, dev))
    out = torch.empty(u.shape, device=dev, dtype=u.dtype)
    n_ck = _cdiv(length, step) if store_ckpt else 0
    ckpt = torch.empty(bsz, n_ck, dstate, dim, device=dev, dtype=f32) if store_ckpt else None
    seg_len = _cdiv(_cdiv(length, max(1, segments)), step) * step
    segments = _cdiv(length, seg_len) if segments > 1 else 1
    try:
        if segments == 1:
            last = torch.empty(bsz, dim, dstate, device=dev, dtype=f32) if store_last else None
            launch(h0, out, last, ckpt, None, 1, _cdiv(length, step) * step)
            return out, last, ckpt
        local = torch.empty(bsz, segments, dim, dstate, device=dev, dtype=f32)
        dsum = torch.empty(bsz, segments, dim, device=dev, dtype=f32)
        launch(None, None, local, None, dsum, segments, seg_len)
        start = torch.empty_like(local)
        final = torch.empty(bsz, dim, dstate, device=dev, dtype=f32)
        block = 256
        _seg_combine_kernel[(_cdiv(dim * dstate, block), bsz)](
            local, dsum, A.contiguous(), h0 if h0 is not None else local, start, final,
            segments, dim * dstate, dstate, HAS_H0=h0 is not None, BLOCK=block)
        launch(start, out, None, ckpt, None, segments, seg_len)
        return out, (final if store_last else None), ckpt
    except nvrtc.NvrtcError as exc:
        _cuda_failed("fwd", kernel, exc, dev)
        return _fwd(u, delta, A, Bg, Cg, D, z, delta_bias, h0, softplus, store_last, store_ckpt,
                    cfg, seg_arg, "triton")


def _bwd_seeds(dout, dlast, delta, A, At, Cg, z, delta_bias, softplus, step: int,
               segments: int, kernel: str = "triton",
               crows: Tensor | None = None) -> tuple[Tensor | None, int, int]:
    """Passes 1-2 of the segment-parallel backward: the adjoint seed past the end of each of
    ``segments`` time segments (whole checkpoint segments of ``step`` steps), (B, S, D, N),
    from each segment's local adjoint and the reverse combine. The local adjoints come from
    ``cuda_scan.selective_scan_adj_local_cuda`` when ``kernel`` is "cuda"/"cuda-auto" (its
    NvrtcError propagates to ``_bwd``; ``crows``: C as ``cuda_scan.rows16`` makes it, made
    here when None), else from ``_adj_local_kernel``. Returns (seeds or dlast, S, checkpoint
    segments per time segment)."""
    bsz, dim, length = delta.shape
    n_ck = _cdiv(length, step)
    ck_per = _cdiv(n_ck, max(1, segments))
    S = _cdiv(n_ck, ck_per)
    if S == 1:
        return dlast, 1, ck_per
    groups, dstate = Cg.shape[1], A.shape[1]
    dev, f32 = delta.device, torch.float32
    local = torch.empty(bsz, S, dim, dstate, device=dev, dtype=f32)
    dsum = torch.empty(bsz, S, dim, device=dev, dtype=f32)
    if kernel in ("cuda", "cuda-auto"):  # _bwd made the streams contiguous, dout in their dtype
        crows = crows if crows is not None else cuda_scan.rows16(Cg)
        cuda_scan.selective_scan_adj_local_cuda(delta, z, dout, A, crows, delta_bias, softplus,
                                                local, dsum, S, ck_per * step)
    else:
        cfg1 = pick_fwd_config(dim // groups)
        Cf = _rows_bc(Cg, cfg1.T)
        (gx, _), n_blk_g = _grid(bsz, dim, groups, cfg1)
        zs = z if z is not None else dout
        _adj_local_kernel[(gx, bsz, S)](
            delta, At, Cf, zs, delta_bias if delta_bias is not None else local, dout, local,
            dsum, length, dstate, dim // groups, n_blk_g, ck_per * step,
            *delta.stride(), At.stride(1), At.stride(0), *Cf.stride()[:3], *zs.stride(),
            *dout.stride(), *local.stride(), *dsum.stride()[:2],
            HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
            NP=Cf.shape[3], FAST=_fast_math(), num_warps=cfg1.num_warps, T=cfg1.T,
            BD=cfg1.block_d,
        )
    seeds = torch.empty_like(local)
    block = 256
    _seg_combine_kernel[(_cdiv(dim * dstate, block), bsz)](
        local, dsum, A.contiguous(), dlast if dlast is not None else local, seeds, seeds,
        S, dim * dstate, dstate, HAS_H0=dlast is not None, BLOCK=block, REVERSE=True)
    return seeds, S, ck_per


# devices where a CUDA kernel failed to compile or launch in auto mode (warned once), per pass
_CUDA_BROKEN: dict[str, set[torch.device]] = {"fwd": set(), "bwd": set()}
_PASS_NAMES = {"fwd": "forward", "bwd": "backward"}


def _cuda_failed(which: str, kernel: str, exc: Exception, device: torch.device) -> None:
    """A CUDA kernel of pass ``which`` failed to compile or launch: a one-line error when it was
    forced ("cuda"); in auto mode ("cuda-auto") a one-time warning, and the device is not tried
    again (the caller then runs the Triton kernel)."""
    pname = _PASS_NAMES[which]
    if kernel == "cuda":
        raise AlignMambaError(f"selective_scan_triton: CUDA {pname} failed: {exc}") from None
    _warn_once(f"{which}_nvrtc", f"alignmamba: CUDA scan {pname} failed ({exc}); using the "
               f"slower Triton {pname}")
    _CUDA_BROKEN[which].add(device)


def _pick_kernel(which: str, kernel: str | None, u: Tensor, delta: Tensor, z: Tensor | None,
                 dstate: int, step: int | None) -> str:
    """"cuda" (``scan_fwd.cu`` / ``scan_bwd.cu`` through NVRTC; "cuda-auto" when it was not
    forced, so that a compile or launch failure falls back instead of raising) or "triton" for
    pass ``which`` ("fwd" or "bwd"). ``kernel``: "cuda", "triton", or None/"auto" (the
    environment variable ALIGNMAMBA_SCAN_FWD / ALIGNMAMBA_SCAN_BWD replaces auto): CUDA where
    it can run, else Triton with a one-time warning on CUDA tensors. ``step``: checkpoint
    spacing (None: the forward stores no checkpoints)."""
    env, arg = (ENV_FWD, "fwd_kernel") if which == "fwd" else (ENV_BWD, "bwd_kernel")
    name, source = env_choice(kernel, ("auto", "cuda", "triton"), env, "selective_scan_triton",
                              arg)
    if name == "triton" or (name == "auto" and u.device in _CUDA_BROKEN[which]):
        return "triton"  # forced, or the CUDA kernel failed here before (warned then)
    check = cuda_scan.fwd_supported if which == "fwd" else cuda_scan.bwd_supported
    ok, why = check(u, delta, z, dstate, step)
    if ok:
        return "cuda" if name == "cuda" else "cuda-auto"
    if name == "cuda":
        raise AlignMambaError(f"selective_scan_triton: {source}='cuda' cannot run: {why}")
    if u.is_cuda:
        pname = _PASS_NAMES[which]
        _warn_once(f"{which}_{why}", f"alignmamba: CUDA scan {pname} unavailable ({why}); "
                   f"using the slower Triton {pname}")
    return "triton"


def _bwd_outputs(u, delta, z, D, delta_bias, h0, groups: int, dstate: int, S: int,
                 slices: int = 0) -> tuple:
    """The gradient buffers either backward kernel writes: du, ddelta, dz (B, D, L)
    contiguous (the CUDA kernel indexes them so); dA partials (B*S, D, N); dB, dC
    (B, G, N, L) fp32 zeroed (atomics), or (slices, B, G, N, L) for the deterministic CUDA
    backward; dD and d(delta_bias) partials (B*S, D); dh0 (B, D, N); None where the input is
    absent."""
    bsz, dim, length = u.shape
    dev, f32 = u.device, torch.float32
    du = torch.empty(u.shape, device=dev, dtype=u.dtype)
    ddelta = torch.empty(u.shape, device=dev, dtype=delta.dtype)
    dz = torch.empty(u.shape, device=dev, dtype=z.dtype) if z is not None else None
    dA_part = torch.empty(bsz * S, dim, dstate, device=dev, dtype=f32)
    bc_shape = ((slices,) if slices else ()) + (bsz, groups, dstate, length)
    dBg = torch.zeros(bc_shape, device=dev, dtype=f32)
    dCg = torch.zeros(bc_shape, device=dev, dtype=f32)
    dD_part = torch.empty(bsz * S, dim, device=dev, dtype=f32) if D is not None else None
    dbias_part = torch.empty(bsz * S, dim, device=dev, dtype=f32) if delta_bias is not None \
        else None
    dh0 = torch.empty(bsz, dim, dstate, device=dev, dtype=f32) if h0 is not None else None
    return du, ddelta, dz, dA_part, dBg, dCg, dD_part, dbias_part, dh0


def _bwd(dout, dlast, u, delta, A, Bg, Cg, D, z, delta_bias, h0, ckpt, softplus,
         cfg: ScanConfig, segments: int | None = None, kernel: str = "triton"):
    """Backward launches. ``segments`` > 1 (KERNEL_NOTES v8): the adjoint seeds of that many
    time segments first (``_bwd_seeds``), then every segment's backward in parallel; same
    results up to fp32 rounding (dA, dD, d(delta_bias) partials are summed over segments).
    None: the picker of the kernel that runs. ``kernel``: "cuda"/"cuda-auto" (KERNEL_NOTES v9
    and v10: ``cuda_scan``'s seeds and main kernels; "cuda-auto" falls back to Triton with a
    one-time warning if NVRTC fails) or "triton" (``_adj_local_kernel``, ``_ssm_bwd_kernel``)."""
    # under torch.use_deterministic_algorithms: the CUDA backward's deterministic variant
    # (v11, dB/dC per channel block summed in a fixed order); the Triton kernel sums dB/dC
    # with atomics and has none, so autograd through the PyTorch scan replaces it
    det = torch.are_deterministic_algorithms_enabled()
    if det and kernel == "triton":
        _warn_once("bwd_deterministic", "alignmamba: deterministic algorithms are on and the "
                   "CUDA scan backward cannot run here; using the PyTorch scan's backward "
                   "(slower) instead of the Triton one, whose dB/dC sums use atomics")
        return _bwd_torch(dout, dlast, u, delta, A, Bg, Cg, D, z, delta_bias, h0, softplus)
    bsz, dim, length = u.shape
    groups, dstate = Bg.shape[1], A.shape[1]
    At = A.t().contiguous()
    seg_arg = segments
    version = 11 if det else cuda_scan.BWD_VERSION
    if segments is None:
        segments = (cuda_scan.pick_segments(bsz, dim, groups, length, u.device, version)
                    if kernel.startswith("cuda") else
                    pick_bwd_segments(bsz, dim, groups, length, cfg, u.device))
    step = cfg.BL * cfg.CK
    if kernel in ("cuda", "cuda-auto"):
        # the CUDA kernels index (B, D, L) rows of one dtype: one copy here serves both launches
        u, delta, dout = u.contiguous(), delta.contiguous(), dout.to(u.dtype).contiguous()
        z = z.contiguous() if z is not None else None
        try:
            # B, C one row of states per step: the seeds pass reads C so, and v11 both
            rows = (cuda_scan.rows16(Bg) if version == 11 else None, cuda_scan.rows16(Cg))
            seeds, S, ck_per = _bwd_seeds(dout, dlast, delta, A, At, Cg, z, delta_bias, softplus,
                                          step, max(1, int(segments)), kernel, rows[1])
            outs = _bwd_outputs(u, delta, z, D, delta_bias, h0, groups, dstate, S,
                                cuda_scan.det_slices(dim // groups) if det else 0)
            cuda_scan.selective_scan_bwd_cuda(dout, seeds, S, ck_per, u, delta, A, Bg, Cg, D, z,
                                              delta_bias, h0, ckpt, softplus, outs,
                                              rows if rows[0] is not None else None,
                                              version=version, deterministic=det)
        except nvrtc.NvrtcError as exc:
            _cuda_failed("bwd", kernel, exc, u.device)
            return _bwd(dout, dlast, u, delta, A, Bg, Cg, D, z, delta_bias, h0, ckpt, softplus,
                        cfg, seg_arg, "triton")
    else:
        seeds, S, ck_per = _bwd_seeds(dout, dlast, delta, A, At, Cg, z, delta_bias, softplus,
                                      step, max(1, int(segments)))
        outs = _bwd_outputs(u, delta, z, D, delta_bias, h0, groups, dstate, S)
        _launch_bwd(dout, seeds, S, ck_per, u, delta, At, Bg, Cg, D, z, delta_bias, h0, ckpt,
                    softplus, cfg, outs)
    du, ddelta, dz, dA_part, dBg, dCg, dD_part, dbias_part, dh0 = outs
    if dBg.dim() == 5:  # the deterministic backward's per-block slices
        dBg, dCg = dBg.sum(0), dCg.sum(0)
    dA = dA_part.sum(0)
    dD = dD_part.sum(0) if dD_part is not None else None
    dbias = dbias_part.sum(0) if dbias_part is not None else None
    return du, ddelta, dA, dBg, dCg, dD, dz, dbias, dh0


def _bwd_torch(dout, dlast, u, delta, A, Bg, Cg, D, z, delta_bias, h0, softplus) -> tuple:
    """The backward by autograd through the PyTorch chunked scan (deterministic where the
    Triton backward is not); arguments and results as :func:`_bwd`'s."""
    from alignmamba.ssm.scan import selective_scan_chunked

    ins = (u, delta, A, Bg, Cg, D, z, delta_bias, h0)
    leaves = [t.detach().requires_grad_() if t is not None else None for t in ins]
    with torch.enable_grad():
        out, last = selective_scan_chunked(*leaves[:8], delta_softplus=softplus,
                                           return_last_state=True, initial_state=leaves[8])
        outs, gouts = [out], [dout]
        if dlast is not None:
            outs.append(last)
            gouts.append(dlast)
        used = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(outs, used, gouts, allow_unused=True))
    res = [next(grads) if t is not None else None for t in leaves]
    res = [torch.zeros_like(t) if g is None and t is not None else g for g, t in zip(res, leaves)]
    du, ddelta, dA, dBg, dCg, dD, dz, dbias, dh0 = res
    return du, ddelta, dA, dBg.float(), dCg.float(), dD, dz, dbias, dh0


def _launch_bwd(dout, seeds, S, ck_per, u, delta, At, Bg, Cg, D, z, delta_bias, h0, ckpt,
                softplus, cfg: ScanConfig, outs: tuple) -> None:
    """The Triton backward kernel (v3 tiles, v8 segments) into ``outs`` (as ``_bwd`` made them)."""
    du, ddelta, dz, dA_part, dBg, dCg, dD_part, dbias_part, dh0 = outs
    bsz, dim, length = u.shape
    groups, dstate = Bg.shape[1], At.shape[0]
    (gx, _), n_blk_g = _grid(bsz, dim, groups, cfg)
    dev, f32 = u.device, torch.float32
    # (B, D, L) outputs share one set of strides
    assert du.stride() == ddelta.stride() and (dz is None or dz.stride() == du.stride())
    np2 = cfg.NI * cfg.NL
    n_prog = gx * bsz * S
    scr = torch.empty(n_prog, cfg.CK, np2, cfg.block_d, device=dev, dtype=f32) if cfg.CK > 1 \
        else torch.empty(1, device=dev, dtype=f32)
    zs = z if z is not None else u
    dummy = dA_part
    _ssm_bwd_kernel[(gx, bsz, S)](
        u, delta, At, Bg, Cg,
        D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy,
        dout, seeds if seeds is not None else dummy, ckpt, scr,
        du, ddelta, dz if dz is not None else dummy, dA_part, dBg, dCg,
        dD_part if dD_part is not None else dummy,
        dbias_part if dbias_part is not None else dummy,
        dh0 if dh0 is not None else dummy,
        length, dstate, dim // groups, n_blk_g, dim, ck_per,
        *u.stride(), *delta.stride(), At.stride(1), At.stride(0), *Bg.stride(), *Cg.stride(), *zs.stride(),
        *dout.stride(),
        *dA_part.stride(),
        ckpt.stride(0), ckpt.stride(1), ckpt.stride(2),
        *du.stride(), *dBg.stride(),
        scr.stride(0) if cfg.CK > 1 else 0,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(softplus), HAS_H0=h0 is not None, HAS_DLAST=seeds is not None,
        FAST=_fast_math(), num_warps=cfg.num_warps, **cfg.meta(),
    )


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, Bg, Cg, D, z, delta_bias, initial_state, softplus,
                return_last_state, need_grad, cfg_f, cfg_b, segments,
                bwd_segments, fwd_kernel, bwd_kernel):  # type: ignore[override]
        # Bg, Cg: (B, G, N, L) views from _check (their gradients flow back through the view)
        u, delta, z = _lastdim_contig(u), _lastdim_contig(delta), _lastdim_contig(z)
        h0 = initial_state.contiguous() if initial_state is not None else None
        # the backward walks the forward's checkpoints: same spacing in steps
        step = cfg_f.T * cfg_f.CK
        assert step == cfg_b.BL * cfg_b.CK, (cfg_f, cfg_b)
        kernel = _pick_kernel("fwd", fwd_kernel, u, delta, z, A.shape[1],
                              step if need_grad else None)
        out, last, ckpt = _fwd(u, delta, A, Bg, Cg, D, z, delta_bias, h0, softplus,
                               return_last_state, need_grad, cfg_f, segments, kernel)
        if need_grad:
            ctx.save_for_backward(u, delta, A, _prep_bc(Bg), _prep_bc(Cg), D, z, delta_bias, h0,
                                  ckpt)
            ctx.softplus = softplus
            ctx.cfg_b = cfg_b
            ctx.bwd_segments = bwd_segments
            ctx.bwd_kernel = bwd_kernel
            ctx.dtypes = (Bg.dtype, Cg.dtype)
        ctx.set_materialize_grads(False)
        if return_last_state:
            return out, last
        return out

    @staticmethod
    def backward(ctx, dout, *rest):  # type: ignore[override]
        u, delta, A, Bg, Cg, D, z, delta_bias, h0, ckpt = ctx.saved_tensors
        dlast = rest[0] if rest else None
        if dout is None:
            dout = torch.zeros_like(u)
        dout = _lastdim_contig(dout)
        if dlast is not None:
            dlast = dlast.contiguous()
        cfg_b = ctx.cfg_b
        kernel = _pick_kernel("bwd", ctx.bwd_kernel, u, delta, z, A.shape[1], cfg_b.BL * cfg_b.CK)
        du, ddelta, dA, dBg, dCg, dD, dz, dbias, dh0 = _bwd(
            dout, dlast, u, delta, A, Bg, Cg, D, z, delta_bias, h0, ckpt, ctx.softplus,
            cfg_b, ctx.bwd_segments, kernel)
        dB = dBg.to(ctx.dtypes[0])
        dC = dCg.to(ctx.dtypes[1])
        dA = dA.to(A.dtype)
        if dD is not None:
            dD = dD.to(D.dtype)
        if dbias is not None:
            dbias = dbias.to(delta_bias.dtype)
        if dh0 is not None:
            dh0 = dh0.to(h0.dtype)
        return (du, ddelta, dA, dB, dC, dD, dz, dbias, dh0, None, None, None, None, None, None,
                None, None, None)


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    initial_state: Tensor | None = None,
    block_l: int | None = None,
    chunks_per_ckpt: int | None = None,
    segments: int | None = None,
    bwd_segments: int | None = None,
    fwd_kernel: str | None = None,
    bwd_kernel: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fused selective scan (SPEC section 1, mamba-ssm ``selective_scan_ref`` semantics).

    u, delta, z: (B, D, L) fp32/bf16/fp16; A: (D, N) fp32; B, C: (B, N, L) or (B, G, N, L);
    D, delta_bias: (D,); initial_state: (B, D, N). Returns out (B, D, L) in ``u.dtype``, or
    (out, last_state (B, D, N) fp32). Differentiable in every tensor argument. Runs on CUDA,
    or on CPU under ``TRITON_INTERPRET=1`` (slow; tests only). ``block_l`` (power of 2) and
    ``chunks_per_ckpt`` override the time tile of both passes and the checkpoint spacing
    (``block_l * chunks_per_ckpt`` steps). ``segments``: time segments the forward scans in
    parallel (None: the picker of the forward kernel that runs, :func:`pick_segments` or
    ``cuda_scan.pick_fwd_segments``; more than one only when batch x channels leave the GPU's
    SMs idle). ``bwd_segments``: the same for the backward (:func:`pick_bwd_segments` or
    ``cuda_scan.pick_segments``). ``fwd_kernel``, ``bwd_kernel``: "cuda" (CUDA C++ through
    NVRTC, ``cuda_scan``), "triton", or None/"auto" (environment variables ALIGNMAMBA_SCAN_FWD,
    ALIGNMAMBA_SCAN_BWD; auto = CUDA where it can run, KERNEL_NOTES v9 and v10).
    """
    Bg, Cg, _ = _check(u, delta, A, B, C, D, z, delta_bias, initial_state)
    for arg, val in (("fwd_kernel", fwd_kernel), ("bwd_kernel", bwd_kernel)):
        if val not in (None, "auto", "cuda", "triton"):
            raise AlignMambaError(f"selective_scan_triton: {arg}={val!r} is not one of "
                                  "auto, cuda, triton")
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)
    dstate = A.shape[1]
    groups = 1 if B.dim() == 3 else B.shape[1]
    dg = u.shape[1] // groups
    cfg_f = pick_fwd_config(dg, block_l, chunks_per_ckpt)
    step = cfg_f.T * cfg_f.CK
    # the backward's tile: its own default length unless told, the forward's spacing
    bl_b = block_l if block_l is not None else min(4, step)
    cfg_b = pick_config(dstate, dg, True, bl_b, step // bl_b)
    if segments is not None:
        segments = max(1, int(segments))
    if bwd_segments is not None:
        bwd_segments = max(1, int(bwd_segments))
    return _SelectiveScanFn.apply(u, delta, A, Bg, Cg, D, z, delta_bias, initial_state,
                                  bool(delta_softplus), bool(return_last_state), need_grad,
                                  cfg_f, cfg_b, segments, bwd_segments, fwd_kernel, bwd_kernel)
