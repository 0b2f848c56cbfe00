"""The selective scan's forward and backward as CUDA C++ kernels (``scan_fwd.cu``,
``scan_bwd.cu``) compiled by NVRTC.

Used by :func:`alignmamba.ssm.triton_scan.selective_scan_triton` in place of its Triton
kernels when NVRTC works on the device and the call fits the kernels (N <= 16; u, delta, z
(and the incoming gradient) of one dtype among fp32/bf16/fp16; checkpoints every 64 steps).
The backward's segment seeds (each segment's local adjoint, ``ssm_adj_local``) run in CUDA
with it; the small combine across segments stays Triton. Design: docs/KERNEL_NOTES.md, v9
(the two-threads-per-channel backward ``ssm_bwd``), v10 (forward, seeds) and v11 (the
backward in the forward's layout, ``ssm_bwd4``: the default, :data:`BWD_VERSION`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from alignmamba.ssm import nvrtc

__all__ = ["BWD_VERSION", "SEG", "bwd_supported", "det_slices", "fwd_supported", "pick_fwd_segments", "pick_segments",
           "rows16", "rows_bc16", "selective_scan_adj_local_cuda", "selective_scan_bwd_cuda", "selective_scan_fwd_cuda"]

SEG = 64          # checkpoint spacing the kernel walks (the forward's T * CK)
BWD_VERSION = 11  # backward kernel: 11 = ssm_bwd4 (KERNEL_NOTES v11), 9 = ssm_bwd (v9)
CHANNELS_PER_BLOCK = 128  # v9: two threads per channel; a multiple of 16 (one warp = 16 channels)
_NP, _TS, _KS = 16, 8, 8


def smem_bytes(ch: int) -> int:
    """Shared memory of a block of ``ch`` channels: sub-chunk start states, one sub-chunk's
    states, B and C rows of a checkpoint segment, the warps' dB/dC sums (double-buffered)."""
    nt = 2 * ch
    return (_KS * 2 * nt * 16 + _TS * 2 * nt * 16 + 2 * SEG * _NP * 4
            + 2 * (nt // 32) * _TS * 2 * _NP * 4)


# v11 (ssm_bwd4): 4 warps x 8 channels, 4 lanes per channel; shared memory as laid out by the
# SM4_* offsets of scan_bwd.cu (the kernel traps if it is given less)
BWD4_CHANNELS_PER_BLOCK = 32
BWD4_THREADS = 128
BWD4_MIN_BLOCKS = 3       # __launch_bounds__: 168 registers, 3 resident blocks per SM
BWD_SEEDS_COST = 0.25     # v11 picker: the seeds pass relative to one pass of the main kernel


def det_slices(group_dim: int) -> int:
    """Slices of dB, dC in the deterministic v11 backward: its channel blocks per group."""
    return -(-group_dim // BWD4_CHANNELS_PER_BLOCK)


def smem_bytes4() -> int:
    """Shared memory of an ``ssm_bwd4`` block: B, C rows of a checkpoint segment; (delta,
    delta u) of its 64 steps per channel; the state at each 8-step sub-chunk's start per lane;
    per-lane partials (y, then the adjoint's sums); the gated dout; the warps' channel sums of
    a sub-chunk (two buffers)."""
    floats = (2 * SEG * _NP + 4 * (SEG // 2) * 8 * 4 + (SEG // _TS) * 128 * 4
              + 4 * 4 * 8 * 20 + 4 * 8 * 12 + 2 * 4 * 32 * 9)
    return 4 * floats


_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _supported(u: Tensor, delta: Tensor, z: Tensor | None, dstate: int,
               step: int | None) -> tuple[bool, str]:
    """What both kernels need; ``step`` None: no checkpoints are involved."""
    if dstate > _NP:
        return False, f"N={dstate} > {_NP}"
    if step is not None and step != SEG:
        return False, f"checkpoints every {step} steps (the kernels use {SEG})"
    dts = {t.dtype for t in (u, delta, z) if t is not None}
    if len(dts) != 1 or next(iter(dts)) not in _DTYPES:
        return False, f"u/delta/z dtypes {sorted(map(str, dts))} (one of fp32/bf16/fp16 needed)"
    return _device_supported(u.device)


_DEVICE_OK: dict[torch.device, tuple[bool, str]] = {}


def _device_supported(device: torch.device) -> tuple[bool, str]:
    """NVRTC and the driver reachable, compute capability >= 8.0 (asked once per device: this
    runs on every scan call)."""
    res = _DEVICE_OK.get(device)
    if res is None:
        ok, why = nvrtc.available(device)
        if ok and torch.cuda.get_device_capability(device) < (8, 0):
            ok, why = False, "compute capability < 8.0"
        res = _DEVICE_OK[device] = (ok, why)
    return res


def fwd_supported(u: Tensor, delta: Tensor, z: Tensor | None, dstate: int,
                  step: int | None) -> tuple[bool, str]:
    """(True, "") when the CUDA forward can run this call, else (False, why). ``step``: the
    checkpoint spacing the backward expects, None for inference (no checkpoints)."""
    return _supported(u, delta, z, dstate, step)


def bwd_supported(u: Tensor, delta: Tensor, z: Tensor | None, dstate: int,
                  step: int) -> tuple[bool, str]:
    """(True, "") when the CUDA backward can run this call, else (False, why)."""
    ok, why = _supported(u, delta, z, dstate, step)
    if not ok:
        return ok, why
    props = torch.cuda.get_device_properties(u.device)
    have = getattr(props, "shared_memory_per_block_optin", 0)
    need = smem_bytes4() if BWD_VERSION == 11 else smem_bytes(CHANNELS_PER_BLOCK)
    if have and have < need:
        return False, f"{need} bytes of shared memory per block needed, the device has {have}"
    return True, ""


def blocks_per_sm(ch: int) -> int:
    """v9: resident blocks per SM: 255 registers per thread leave 8 warps (ch / 16 per block),
    and shared memory (228 KB per SM on Hopper, 1 KB of it reserved per block) may allow
    fewer."""
    return max(1, min(128 // ch, 233472 // (smem_bytes(ch) + 1024)))


def blocks_per_sm4() -> int:
    """v11: resident ``ssm_bwd4`` blocks per SM: the register budget's 3, or fewer if shared
    memory (228 KB per SM, 1 KB reserved per block) does not hold 3."""
    return max(1, min(BWD4_MIN_BLOCKS, 233472 // (smem_bytes4() + 1024)))


def pick_segments(bsz: int, dim: int, groups: int, length: int, device: torch.device,
                  version: int | None = None) -> int:
    """Time segments for the CUDA backward (``version``: 9 or 11, None: :data:`BWD_VERSION`).
    A fixed number of blocks per SM run at a time (:func:`blocks_per_sm`,
    :func:`blocks_per_sm4`), so choose S (whole checkpoint segments, >= 4 each) that minimises
    the time of the slowest SM, waves / S; another S must win by 3%. v11 also charges the seeds
    pass that any S > 1 needs (BWD_SEEDS_COST of a main pass): at the issue shape its blocks
    fit in one wave and S = 1 skips it."""
    if device.type != "cuda":
        return 1
    v11 = (version or BWD_VERSION) == 11
    dg = dim // groups
    ch = BWD4_CHANNELS_PER_BLOCK if v11 else CHANNELS_PER_BLOCK
    blocks = bsz * groups * -(-dg // ch)
    sms = torch.cuda.get_device_properties(device).multi_processor_count * (
        blocks_per_sm4() if v11 else blocks_per_sm(ch))
    n_ck = -(-length // SEG)
    seeds = BWD_SEEDS_COST if v11 else 0.0
    best, best_cost = 1, float("inf")
    for s in range(1, min(64, max(1, n_ck // 4)) + 1):
        cost = (1 + (seeds if s > 1 else 0.0)) * -(-blocks * s // sms) / s
        if cost < best_cost * 0.97:
            best, best_cost = s, cost
    return best


def selective_scan_bwd_cuda(dout, seeds, S, ck_per, u, delta, A, Bg, Cg, D, z, delta_bias, h0,
                            ckpt, softplus, outs: tuple, rows: tuple | None = None,
                            version: int | None = None, deterministic: bool = False) -> None:
    """Launch the backward kernel of ``version`` (None: :data:`BWD_VERSION`; 11: ``ssm_bwd4``,
    9: ``ssm_bwd``) on all (channel block, batch, time segment) at once.
    ``deterministic``: v11 only; each channel block stores its dB, dC sums in its own slice
    (dB, dC of ``outs`` then (:func:`det_slices`, B, G, N, L), to be summed over dim 0 by the
    caller) instead of adding them with atomics in whatever order the blocks run.

    Shapes as in ``triton_scan._bwd``: u, delta, z, dout (B, D, L) contiguous, one dtype (as
    ``_bwd`` passes them); A (D, N); Bg, Cg (B, G, N, L) fp32 with contiguous time; ckpt
    (B, n_ck, N, D); seeds (B, S, D, N) or None. ``rows``: (B, C) as :func:`rows16` makes them,
    which v11 reads (made here when None).
    ``outs`` as ``_bwd`` allocates them for either kernel: du, ddelta, dz (B, D, L)
    contiguous, dA partials (B*S, D, N), dB, dC (B, G, N, L) fp32 zeroed, dD and d(delta_bias)
    partials (B*S, D), dh0 (B, D, N); None where the input is absent."""
    du, ddelta, dz, dA_part, dB, dC, dD_part, dbias_part, dh0 = outs
    bsz, dim, length = u.shape
    groups, dstate = Bg.shape[1], A.shape[1]
    dg = dim // groups
    v11 = (version or BWD_VERSION) == 11
    assert v11 or not deterministic, "the deterministic backward is v11's"
    ch = BWD4_CHANNELS_PER_BLOCK if v11 else CHANNELS_PER_BLOCK
    n_blk_g = -(-dg // ch)
    if deterministic:
        assert dB.shape == (n_blk_g, bsz, groups, dstate, length) == dC.shape, dB.shape
    dev, f32 = u.device, torch.float32
    if v11:
        Bg, Cg = rows if rows is not None else (rows16(Bg), rows16(Cg))
    else:
        Bg, Cg = Bg.contiguous(), Cg.contiguous()
    Af = A.to(f32).contiguous()
    Dv = D.to(f32).contiguous() if D is not None else None
    bias = delta_bias.to(f32).contiguous() if delta_bias is not None else None
    streams = [t for t in (u, delta, dout, z, du, ddelta, dz) if t is not None]
    assert all(t.is_contiguous() for t in streams) and dout.dtype == u.dtype
    vec = length % 8 == 0 and all(t.data_ptr() % 16 == 0 for t in streams)
    flags = (D is not None, z is not None, bias is not None, bool(softplus), h0 is not None,
             seeds is not None, vec)
    name = "ssm_bwd4" if v11 else "ssm_bwd"
    expr = f"{name}<{_DTYPES[u.dtype]}, " + ", ".join("true" if f else "false"
                                                      for f in flags) + ">"
    smem = smem_bytes4() if v11 else smem_bytes(ch)
    opts = (f"-DMINB4={BWD4_MIN_BLOCKS}", f"-DDET4={int(deterministic)}") if v11 else (f"-DCH={ch}",)
    kern = nvrtc.get_kernel("scan_bwd.cu", expr, dev, smem, opts)
    n_ck = ckpt.shape[1]
    kern((groups * n_blk_g, bsz, S), BWD4_THREADS if v11 else 2 * ch, smem, [
        u, delta, z, dout, Af, Bg, Cg, Dv, bias, ckpt, seeds,
        du, ddelta, dz, dA_part, dB, dC, dD_part, dbias_part, dh0,
        length, dim, dstate, groups, dg, n_blk_g, n_ck, ck_per,
    ], dev)


# ------------------------------------------------------------------------------------------
# forward (scan_fwd.cu, KERNEL_NOTES v10)
# ------------------------------------------------------------------------------------------

FWD_CHANNELS_PER_BLOCK = 32   # 4 warps x 8 channels, 4 lanes per channel
FWD_THREADS = 128
FWD_MIN_BLOCKS = 3            # __launch_bounds__: registers for 3 resident blocks per SM (168)
FWD_GROUP_STEPS = 4           # steps per software-pipelined group (scan_fwd.cu GS: 4 or 8)
FWD_WARPS_PER_SMSP = 2        # segments are cut until the warps give this many per sub-partition
FWD_LOCAL_COST = 0.9          # pass 1 of a segmented forward relative to a full pass


def pick_fwd_segments(bsz: int, dim: int, groups: int, length: int,
                      device: torch.device) -> int:
    """Time segments for the CUDA forward. Its warps walk time sequentially (8 channels each);
    the exp unit of an SM sub-partition is what bounds them, so a single pass wants at least
    FWD_WARPS_PER_SMSP warps on every sub-partition. With fewer, cut time into S segments
    (whole checkpoints, at least 2 each, S <= 64) minimising the modelled time
    (1 + FWD_LOCAL_COST [S > 1]) x ceil(warps S / slots) / S; another S must win by 3%."""
    if device.type != "cuda":
        return 1
    dg = dim // groups
    warps = bsz * groups * -(-dg // FWD_CHANNELS_PER_BLOCK) * (FWD_THREADS // 32)
    slots = 4 * torch.cuda.get_device_properties(device).multi_processor_count \
        * FWD_WARPS_PER_SMSP
    n_ck = -(-length // SEG)
    best, best_cost = 1, float(-(-warps // slots))
    for s in range(2, min(64, n_ck // 2) + 1):
        cost = (1 + FWD_LOCAL_COST) * -(-warps * s // slots) / s
        if cost < best_cost * 0.97:
            best, best_cost = s, cost
    return best


def rows16(t: Tensor) -> Tensor:
    """B or C for the CUDA forward: (B, G, L, 16) fp32, one row of states per step, states
    zero-padded to 16 (the kernel's rows are 64 bytes)."""
    bsz, groups, dstate, length = t.shape
    # one copy kernel (dtype and layout at once; .to().contiguous() would be two launches)
    if dstate == _NP:
        out = torch.empty(bsz, groups, length, _NP, device=t.device, dtype=torch.float32)
        return out.copy_(t.transpose(-1, -2))
    out = torch.zeros(bsz, groups, length, _NP, device=t.device, dtype=torch.float32)
    out[..., :dstate] = t.transpose(-1, -2)
    return out


def rows_bc16(Bt: Tensor, Ct: Tensor) -> Tensor:
    """B and C in bf16 for the forward's BC16 build: (B, G, L, 16) int32, word n of a step's row
    holding B_n in its low and C_n in its high 16 bits (states zero-padded to 16). The kernel
    widens each half to fp32 exactly, so it computes with the same values as from
    :func:`rows16`."""
    bsz, groups, dstate, length = Bt.shape
    assert Bt.dtype == Ct.dtype == torch.bfloat16 and Ct.shape == Bt.shape
    alloc = torch.empty if dstate == _NP else torch.zeros
    pair = alloc(bsz, groups, length, _NP, 2, device=Bt.device, dtype=torch.bfloat16)
    pair[..., :dstate, 0] = Bt.transpose(-1, -2)  # little-endian: element 0 is the low half
    pair[..., :dstate, 1] = Ct.transpose(-1, -2)
    return pair.view(torch.int32).squeeze(-1)


def selective_scan_fwd_cuda(u: Tensor, delta: Tensor, A: Tensor, Brows: Tensor,
                            Crows: Tensor | None, D: Tensor | None, z: Tensor | None,
                            delta_bias: Tensor | None, h0: Tensor | None, softplus: bool,
                            out: Tensor | None, last: Tensor | None, ckpt: Tensor | None,
                            dsum: Tensor | None, S: int, seg_len: int,
                            options: tuple[str, ...] = ()) -> None:
    """Launch ``ssm_fwd`` on all (channel block, batch, time segment) at once.

    u, delta, z, out: (B, D, L) contiguous; A (D, N); Brows, Crows (B, G, L, 16) fp32 from
    :func:`rows16`, or Brows from :func:`rows_bc16` (int32: the BC16 build) and Crows None;
    h0 and last (B, S, D, N) or, with S = 1, (B, D, N), fp32; ckpt (B, n_ck, N, D) fp32;
    dsum (B, S, D). ``out`` None: pass 1 of the segmented forward (each segment's final state
    from zero into ``last``, its delta sum into ``dsum``).
    ``seg_len``: a multiple of SEG. ``options``: "NAME=value" compile-time settings of
    ``scan_fwd.cu`` replacing the defaults (MINB=FWD_MIN_BLOCKS, GS=FWD_GROUP_STEPS;
    benchmarks sweep them)."""
    bsz, dim, length = u.shape
    groups, dstate = Brows.shape[1], A.shape[1]
    dg = dim // groups
    n_blk_g = -(-dg // FWD_CHANNELS_PER_BLOCK)
    local = out is None
    dev, f32 = u.device, torch.float32
    streams = [t for t in (u, delta, z, out) if t is not None]
    assert all(t.is_contiguous() for t in streams) and seg_len % SEG == 0
    vec = length % 8 == 0 and all(t.data_ptr() % 16 == 0 for t in streams)
    Af = A.to(f32).contiguous()
    Dv = D.to(f32).contiguous() if D is not None else None
    bias = delta_bias.to(f32).contiguous() if delta_bias is not None else None
    flags = (D is not None and not local, z is not None and not local, bias is not None,
             bool(softplus), h0 is not None, last is not None, ckpt is not None, local, vec)
    expr = f"ssm_fwd<{_DTYPES[u.dtype]}, " + ", ".join("true" if f else "false"
                                                       for f in flags) + ">"
    packed = Brows.dtype == torch.int32
    assert not (packed and Crows is not None)
    defs = {"GS": str(FWD_GROUP_STEPS), "MINB": str(FWD_MIN_BLOCKS)}
    for opt in options:
        name, _, value = opt.partition("=")
        if name not in defs or not value.isdigit():
            raise ValueError(f"scan_fwd.cu option {opt!r}: one of {sorted(defs)}=<int> expected")
        defs[name] = value
    defs["BC16"] = "1" if packed else "0"  # set by the rows' layout, not by an option
    kern = nvrtc.get_kernel("scan_fwd.cu", expr, dev, 0,
                            tuple(f"-D{k}={v}" for k, v in sorted(defs.items())))
    n_ck = ckpt.shape[1] if ckpt is not None else 0
    kern((groups * n_blk_g, bsz, S), FWD_THREADS, 0, [
        u, delta, z if not local else None, Af, Brows, Crows if not local else None,
        Dv if not local else None, bias, h0, out, last, ckpt, dsum,
        length, dim, dstate, groups, dg, n_blk_g, seg_len, n_ck,
    ], dev)


def selective_scan_adj_local_cuda(delta: Tensor, z: Tensor | None, dout: Tensor, A: Tensor,
                                  Crows: Tensor, delta_bias: Tensor | None, softplus: bool,
                                  local: Tensor, dsum: Tensor, S: int, seg_len: int) -> None:
    """Launch ``ssm_adj_local`` (``scan_fwd.cu``): pass 1 of the segmented backward, each time
    segment's adjoint at its first step from a zero seed past its end into ``local``
    (B, S, D, N) and its delta sum shifted by one step into ``dsum`` (B, S, D), as
    ``triton_scan._adj_local_kernel``. delta, z, dout: (B, D, L) contiguous, one dtype; Crows
    from :func:`rows16`; ``seg_len`` a multiple of SEG."""
    bsz, dim, length = delta.shape
    groups = Crows.shape[1]
    dg = dim // groups
    n_blk_g = -(-dg // FWD_CHANNELS_PER_BLOCK)
    streams = [t for t in (delta, z, dout) if t is not None]
    assert all(t.is_contiguous() and t.dtype == delta.dtype for t in streams)
    assert seg_len % SEG == 0
    vec = length % 8 == 0 and all(t.data_ptr() % 16 == 0 for t in streams)
    bias = delta_bias.to(torch.float32).contiguous() if delta_bias is not None else None
    flags = (z is not None, bias is not None, bool(softplus), vec)
    expr = f"ssm_adj_local<{_DTYPES[delta.dtype]}, " + ", ".join(
        "true" if f else "false" for f in flags) + ">"
    kern = nvrtc.get_kernel("scan_fwd.cu", expr, delta.device, 0,
                            (f"-DMINB={FWD_MIN_BLOCKS}",))
    kern((groups * n_blk_g, bsz, S), FWD_THREADS, 0, [
        delta, z, dout, A.to(torch.float32).contiguous(), Crows, bias, local, dsum,
        length, dim, A.shape[1], groups, dg, n_blk_g, seg_len,
    ], delta.device)
