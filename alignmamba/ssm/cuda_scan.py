"""The selective scan's backward as a CUDA C++ kernel (``scan_bwd.cu``) compiled by NVRTC.

Used by :func:`alignmamba.ssm.triton_scan.selective_scan_triton` in place of its Triton
backward kernel when NVRTC works on the device and the call fits the kernel (N <= 16; u,
delta, z and the incoming gradient of one dtype among fp32/bf16/fp16; checkpoints every 64
steps). The segment seeds (``_bwd_seeds``) stay Triton. Design: docs/KERNEL_NOTES.md, v9.
"""
from __future__ import annotations

import torch
from torch import Tensor

from alignmamba.ssm import nvrtc

__all__ = ["SEG", "bwd_supported", "pick_segments", "selective_scan_bwd_cuda"]

SEG = 64          # checkpoint spacing the kernel walks (the forward's T * CK)
CHANNELS_PER_BLOCK = 128  # two threads per channel; a multiple of 16 (one warp = 16 channels)
_NP, _TS, _KS = 16, 8, 8


def smem_bytes(ch: int) -> int:
    """Shared memory of a block of ``ch`` channels: sub-chunk start states, one sub-chunk's
    states, B and C rows of a checkpoint segment, the warps' dB/dC sums (double-buffered)."""
    nt = 2 * ch
    return (_KS * 2 * nt * 16 + _TS * 2 * nt * 16 + 2 * SEG * _NP * 4
            + 2 * (nt // 32) * _TS * 2 * _NP * 4)
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def bwd_supported(u: Tensor, delta: Tensor, z: Tensor | None, dstate: int,
                  step: int) -> tuple[bool, str]:
    """(True, "") when the CUDA backward can run this call, else (False, why)."""
    if dstate > _NP:
        return False, f"N={dstate} > {_NP}"
    if step != SEG:
        return False, f"checkpoints every {step} steps (the kernel walks {SEG})"
    dts = {t.dtype for t in (u, delta, z) if t is not None}
    if len(dts) != 1 or next(iter(dts)) not in _DTYPES:
        return False, f"u/delta/z dtypes {sorted(map(str, dts))} (one of fp32/bf16/fp16 needed)"
    ok, why = nvrtc.available(u.device)
    if not ok:
        return False, why
    if torch.cuda.get_device_capability(u.device) < (8, 0):
        return False, "compute capability < 8.0"
    props = torch.cuda.get_device_properties(u.device)
    have = getattr(props, "shared_memory_per_block_optin", 0)
    need = smem_bytes(CHANNELS_PER_BLOCK)
    if have and have < need:
        return False, f"{need} bytes of shared memory per block needed, the device has {have}"
    return True, ""


def blocks_per_sm(ch: int) -> int:
    """Resident blocks per SM: 255 registers per thread leave 8 warps (ch / 16 per block), and
    shared memory (228 KB per SM on Hopper, 1 KB of it reserved per block) may allow fewer."""
    return max(1, min(128 // ch, 233472 // (smem_bytes(ch) + 1024)))


def pick_segments(bsz: int, dim: int, groups: int, length: int, device: torch.device) -> int:
    """Time segments for the CUDA backward: a fixed number of blocks per SM run at a time
    (:func:`blocks_per_sm`), so choose S (whole checkpoint segments, >= 4 each) that minimises
    waves / S, i.e. the time of the slowest SM; another S must win by 3% (each segment costs a
    share of the seeds pass)."""
    if device.type != "cuda":
        return 1
    dg = dim // groups
    ch = CHANNELS_PER_BLOCK
    blocks = bsz * groups * -(-dg // ch)
    sms = torch.cuda.get_device_properties(device).multi_processor_count * blocks_per_sm(ch)
    n_ck = -(-length // SEG)
    best, best_cost = 1, float("inf")
    for s in range(1, min(64, max(1, n_ck // 4)) + 1):
        cost = -(-blocks * s // sms) / s
        if cost < best_cost * 0.97:
            best, best_cost = s, cost
    return best


def selective_scan_bwd_cuda(dout, seeds, S, ck_per, u, delta, A, Bg, Cg, D, z, delta_bias, h0,
                            ckpt, softplus, outs: tuple) -> None:
    """Launch ``ssm_bwd`` on all (channel block, batch, time segment) at once.

    Shapes as in ``triton_scan._bwd``: u, delta, z, dout (B, D, L); A (D, N); Bg, Cg
    (B, G, N, L) fp32 with contiguous time; ckpt (B, n_ck, N, D); seeds (B, S, D, N) or None.
    ``outs`` as ``_bwd`` allocates them for either kernel: du, ddelta, dz (B, D, L)
    contiguous, dA partials (B*S, D, N), dB, dC (B, G, N, L) fp32 zeroed, dD and d(delta_bias)
    partials (B*S, D), dh0 (B, D, N); None where the input is absent."""
    du, ddelta, dz, dA_part, dB, dC, dD_part, dbias_part, dh0 = outs
    bsz, dim, length = u.shape
    groups, dstate = Bg.shape[1], A.shape[1]
    dg = dim // groups
    ch = CHANNELS_PER_BLOCK
    n_blk_g = -(-dg // ch)
    dev, f32 = u.device, torch.float32
    u, delta, dout = u.contiguous(), delta.contiguous(), dout.to(u.dtype).contiguous()
    z = z.contiguous() if z is not None else None
    Bg, Cg = Bg.contiguous(), Cg.contiguous()
    Af = A.to(f32).contiguous()
    Dv = D.to(f32).contiguous() if D is not None else None
    bias = delta_bias.to(f32).contiguous() if delta_bias is not None else None
    streams = [t for t in (u, delta, dout, z, du, ddelta, dz) if t is not None]
    assert all(t.is_contiguous() for t in streams)
    vec = length % 8 == 0 and all(t.data_ptr() % 16 == 0 for t in streams)
    flags = (D is not None, z is not None, bias is not None, bool(softplus), h0 is not None,
             seeds is not None, vec)
    expr = f"ssm_bwd<{_DTYPES[u.dtype]}, " + ", ".join("true" if f else "false"
                                                       for f in flags) + ">"
    smem = smem_bytes(ch)
    kern = nvrtc.get_kernel("scan_bwd.cu", expr, dev, smem, (f"-DCH={ch}",))
    n_ck = ckpt.shape[1]
    with torch.cuda.device(dev):
        kern((groups * n_blk_g, bsz, S), 2 * ch, smem, [
            u, delta, z, dout, Af, Bg, Cg, Dv, bias, ckpt, seeds,
            du, ddelta, dz, dA_part, dB, dC, dD_part, dbias_part, dh0,
            length, dim, dstate, groups, dg, n_blk_g, n_ck, ck_per,
        ], dev)
