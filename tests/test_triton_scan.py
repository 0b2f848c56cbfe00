"""Triton selective scan vs a float64 recurrence, forward and every gradient.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before Triton is
imported), so sizes stay tiny. On a CUDA machine the same tests run compiled, plus a larger case.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_kernels import CUDA, import_kernels

ts = import_kernels("alignmamba.ssm.triton_scan", "_ssm_fwd_kernel")

from alignmamba.errors import AlignMambaError

DEV = "cuda" if CUDA else "cpu"


def _fast_interpreter_scan():
    """Vectorise the interpreter's generic ``associative_scan`` (test speed only).

    Triton's interpreter applies a custom combine function one element at a time in Python
    (~1 ms per element). This does the same left-to-right fold along the scan axis, one
    whole slice per step, calling the kernel's own combine function: the order of operations
    and thus the results are those of the original; only the Python overhead goes.
    """
    import numpy as np
    from triton.runtime import interpreter as interp

    scan_ops = getattr(interp, "ScanOps", None)
    if scan_ops is None or not hasattr(scan_ops, "generic_scan"):
        return  # a Triton whose interpreter changed: keep its own (slow but correct) scan

    def generic_scan(self, input):
        axis = self.axis
        data = [np.moveaxis(arg.handle.data, axis, 0) for arg in input]
        outs = [np.empty_like(d) for d in data]
        acc = None
        for i in range(data[0].shape[0]):
            cur = tuple(self.to_tensor(np.ascontiguousarray(d[i]), arg.dtype)
                        for d, arg in zip(data, input))
            if acc is None:
                acc = cur
            else:
                ret = self.combine_fn.fn(*acc, *cur)
                acc = ret if isinstance(ret, tuple) else (ret,)
            for o, a in zip(outs, acc):
                o[i] = a.handle.data
        return [self.to_tensor(np.ascontiguousarray(np.moveaxis(o, 0, axis)), arg.dtype)
                for o, arg in zip(outs, input)]

    scan_ops.generic_scan = generic_scan


def _rne_interpreter_bf16():
    """Make the interpreter round fp32 -> bf16 to nearest-even, as the GPU's cvt.rn does.

    The interpreter implements Triton's default (round-to-nearest) fp32 -> bf16 cast by
    truncating the mantissa, which doubles the rounding error of every bf16 output and would
    make the bf16 accuracy test measure the interpreter instead of the kernel.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = getattr(interp, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "create_fp_trunc"):
        return
    original = builder.create_fp_trunc

    def create_fp_trunc(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            t = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            bits = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interp.TensorHandle(bits, tl.bfloat16)
        return original(self, src, dst_type)

    builder.create_fp_trunc = create_fp_trunc


if not CUDA:
    _fast_interpreter_scan()
    _rne_interpreter_bf16()


def ref_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=False, h0=None,
             dtype=torch.float64):
    """The recurrence step by step in ``dtype`` (SPEC section 1); returns (out, last_state)."""
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    dt = delta
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if softplus:
        dt = torch.relu(dt) + torch.log1p(torch.exp(-dt.abs()))
    bsz, dim, length = u.shape
    Bg = B if B.dim() == 4 else B[:, None]
    Cg = C if C.dim() == 4 else C[:, None]
    rep = dim // Bg.shape[1]
    Bd = Bg.repeat_interleave(rep, dim=1)  # (B, D, N, L)
    Cd = Cg.repeat_interleave(rep, dim=1)
    h = u.new_zeros(bsz, dim, A.shape[1]) if h0 is None else h0.to(dtype)
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * Bd[..., t]
        ys.append((h * Cd[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y, h


def make_inputs(bsz, dim, dstate, length, groups, has_d, has_z, has_bias, has_h0, dtype,
                seed, softplus=True, device=DEV):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    x = {
        "u": r(bsz, dim, length).to(dtype),
        # raw delta around -0.5 goes through softplus; without it, positive steps in ~[0.1, 1]
        "delta": ((r(bsz, dim, length, scale=0.5) - 0.5) if softplus
                  else torch.exp(r(bsz, dim, length, scale=0.5) - 1.0)).to(dtype),
        "A": -torch.exp(r(dim, dstate, scale=0.5)),
        "B": (r(bsz, dstate, length) if groups == 0 else r(bsz, groups, dstate, length)).to(dtype),
        "C": (r(bsz, dstate, length) if groups == 0 else r(bsz, groups, dstate, length)).to(dtype),
        "D": r(dim) if has_d else None,
        "z": r(bsz, dim, length).to(dtype) if has_z else None,
        "delta_bias": r(dim, scale=0.5) if has_bias else None,
        "initial_state": r(bsz, dim, dstate) if has_h0 else None,
    }
    return x


GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def run_with_grads(fn, x, softplus, last, dtype_ref=None, seed=0):
    """Forward, then backward of a random projection of (out, last_state); returns dicts."""
    leaves = {}
    for k, v in x.items():
        if v is None:
            leaves[k] = None
        else:
            t = v.detach().clone() if dtype_ref is None else v.detach().to(dtype_ref)
            leaves[k] = t.requires_grad_(True)
    res = fn(leaves, softplus, last)
    out, state = res if isinstance(res, tuple) else (res, None)
    g = torch.Generator().manual_seed(1000 + seed)
    w = torch.randn(out.shape, generator=g).to(out.device, torch.float64)
    loss = (out.to(torch.float64) * w).sum()
    if last:
        ws = torch.randn(state.shape, generator=g).to(out.device, torch.float64)
        loss = loss + (state.to(torch.float64) * ws).sum()
    loss.backward()
    grads = {k: (None if v is None else v.grad) for k, v in leaves.items()}
    return out.detach(), (None if state is None else state.detach()), grads


def triton_fn(block_l=None, ck=None, segments=None, bwd_segments=None, bwd_kernel=None,
              fwd_kernel=None):
    def fn(x, softplus, last):
        return ts.selective_scan_triton(
            x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
            delta_softplus=softplus, return_last_state=last, initial_state=x["initial_state"],
            block_l=block_l, chunks_per_ckpt=ck, segments=segments,
            bwd_segments=bwd_segments, fwd_kernel=fwd_kernel, bwd_kernel=bwd_kernel)
    return fn


def ref_fn(dtype):
    def fn(x, softplus, last):
        out, state = ref_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                              x["delta_bias"], softplus, x["initial_state"], dtype=dtype)
        out = out.to(x["u"].dtype)
        return (out, state) if last else out
    return fn


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_grads_match(x, grads, rgrads, tol=1e-5):
    """Every input's gradient is present, shaped like the input, finite, and within ``tol``
    (relative) of the reference's."""
    for k in GRAD_NAMES:
        if x[k] is None:
            continue
        assert grads[k] is not None and grads[k].shape == x[k].shape, k
        assert torch.isfinite(grads[k]).all(), k
        err = rel_err(grads[k], rgrads[k])
        assert err < tol, f"grad {k}: rel err {err:.2e}"


# (L, BL, CK, N, D, groups, has_D, has_z, has_bias, softplus, last, h0)
CASES = [
    (70, 16, 1, 16, 8, 0, True, True, True, True, True, False),
    (33, 32, 1, 4, 4, 0, False, False, False, False, False, False),
    (70, 16, 2, 8, 8, 2, True, False, True, False, True, True),
    (7, 16, 1, 16, 4, 0, True, True, False, True, False, False),
    (1, 16, 1, 4, 4, 2, False, True, True, True, True, True),
    (33, 16, 3, 5, 6, 3, True, True, True, True, False, False),
]


@pytest.mark.parametrize("case", CASES, ids=[f"L{c[0]}-BL{c[1]}-CK{c[2]}-N{c[3]}-D{c[4]}-G{c[5]}"
                                             for c in CASES])
def test_fp32_forward_and_grads_match_float64(case):
    L, BL, CK, N, D, G, has_d, has_z, has_bias, softplus, last, h0 = case
    x = make_inputs(2, D, N, L, G, has_d, has_z, has_bias, h0, torch.float32, seed=L + N + D,
                    softplus=softplus)
    out, state, grads = run_with_grads(triton_fn(BL, CK), x, softplus, last)
    rout, rstate, rgrads = run_with_grads(ref_fn(torch.float64), x, softplus, last,
                                          dtype_ref=torch.float64)
    assert out.dtype == torch.float32 and out.shape == x["u"].shape
    assert torch.isfinite(out).all()
    assert rel_err(out, rout) < 1e-5
    if last:
        assert state.dtype == torch.float32 and state.shape == (2, D, N)
        assert rel_err(state, rstate) < 1e-5
    assert_grads_match(x, grads, rgrads)


# (L, BL, CK, segments, N, D, groups, h0): lengths not a multiple of a segment, of BL*CK, or of BL
SEG_CASES = [
    (37, 4, 2, 3, 4, 6, 2, True),
    (50, 4, 1, 4, 8, 4, 0, False),
    (29, 2, 4, 2, 3, 5, 0, True),
]


@pytest.mark.parametrize("case", SEG_CASES, ids=[f"L{c[0]}-BL{c[1]}-CK{c[2]}-S{c[3]}" for c in SEG_CASES])
def test_segment_parallel_forward_matches_float64(case):
    """The segment-parallel forward (pass 1 local states, combine, pass 2) and the backward
    through its checkpoints equal the float64 recurrence, final state included."""
    L, BL, CK, S, N, D, G, h0 = case
    step = BL * CK
    assert ts._cdiv(L, ts._cdiv(ts._cdiv(L, S), step) * step) > 1  # really more than one segment
    x = make_inputs(2, D, N, L, G, True, True, True, h0, torch.float32, seed=L + S)
    out, state, grads = run_with_grads(triton_fn(BL, CK, segments=S), x, True, True)
    rout, rstate, rgrads = run_with_grads(ref_fn(torch.float64), x, True, True, dtype_ref=torch.float64)
    assert rel_err(out, rout) < 1e-5 and rel_err(state, rstate) < 1e-5
    assert_grads_match(x, grads, rgrads)
    with torch.no_grad():  # inference: no checkpoints
        o2, s2 = triton_fn(BL, CK, segments=S)(x, True, True)
    assert rel_err(o2, rout) < 1e-5 and rel_err(s2, rstate) < 1e-5


# Forward tiles (KERNEL_NOTES v7: one channel per thread, T steps per chunk unrolled, the next
# chunk's streams loaded one iteration ahead). (L, T, CK, segments, N, D, groups, has_D, has_z,
# has_bias, softplus, last, h0): many chunks (T 2-8) with a partial last chunk, so that using a
# neighbouring chunk's tiles, or dropping the first or last one, changes the output; N not a
# power of 2 (padded states); channels that do not fill a block
FWD_CASES = [
    (37, 4, 3, 1, 8, 8, 0, True, True, True, True, True, True),
    (29, 2, 4, 1, 5, 6, 3, True, True, False, True, True, False),
    (23, 8, 1, 1, 16, 4, 2, False, False, True, False, True, True),
    (70, 16, 2, 1, 8, 8, 2, True, True, True, True, False, False),
    (1, 4, 1, 1, 4, 4, 0, True, True, True, True, True, True),
    (37, 4, 2, 3, 4, 6, 2, True, True, True, True, True, True),
    (50, 2, 4, 4, 3, 5, 0, True, False, True, True, True, False),
]


def _fwd_id(c):
    return f"L{c[0]}-T{c[1]}-CK{c[2]}-S{c[3]}-N{c[4]}-D{c[5]}-G{c[6]}"


@pytest.mark.parametrize("case", FWD_CASES, ids=[_fwd_id(c) for c in FWD_CASES])
def test_forward_tiles_and_grads_match_float64(case):
    """Output, final state and every gradient (backward through the checkpoints this forward
    wrote) equal the float64 recurrence."""
    L, BL, CK, S, N, D, G, has_d, has_z, has_bias, softplus, last, h0 = case
    x = make_inputs(2, D, N, L, G, has_d, has_z, has_bias, h0, torch.float32,
                    seed=100 + L + BL + S, softplus=softplus)
    out, state, grads = run_with_grads(triton_fn(BL, CK, segments=S), x, softplus, last)
    rout, rstate, rgrads = run_with_grads(ref_fn(torch.float64), x, softplus, last,
                                          dtype_ref=torch.float64)
    assert rel_err(out, rout) < 1e-5
    if last:
        assert rel_err(state, rstate) < 1e-5
    assert_grads_match(x, grads, rgrads)


def test_default_tiles_forward_and_grads_match_float64():
    """The default tiles: forward T=8 with a checkpoint every 8 chunks, backward BL=4 with one
    every 16 (the same 64 steps); 150 steps = 3 checkpoint segments, the last one partial."""
    x = make_inputs(1, 6, 16, 150, 0, True, True, True, True, torch.float32, seed=31)
    f = ts.pick_fwd_config(6)
    assert (f.T, f.CK, f.num_warps) == (8, 8, 1)
    out, state, grads = run_with_grads(triton_fn(), x, True, True)
    rout, rstate, rgrads = run_with_grads(ref_fn(torch.float64), x, True, True,
                                          dtype_ref=torch.float64)
    assert rel_err(out, rout) < 1e-5 and rel_err(state, rstate) < 1e-5
    assert_grads_match(x, grads, rgrads)


def test_rows_bc_is_transposed_and_zero_padded():
    """B, C for the forward: (B, G, L_pad + 1, NP) fp32, rows = steps, padding all zero."""
    t = torch.randn(2, 3, 5, 13, dtype=torch.bfloat16)
    r = ts._rows_bc(t, 8)
    assert r.shape == (2, 3, 17, 8) and r.dtype == torch.float32 and r.is_contiguous()
    assert torch.equal(r[:, :, :13, :5], t.float().transpose(-1, -2))
    assert not r[:, :, 13:].any() and not r[..., 5:].any()


def test_checkpoint_spacing_agrees_between_passes():
    """Whatever the overrides, the backward walks the forward's checkpoints: equal spacing."""
    seen = []
    real = ts._SelectiveScanFn.apply

    def spy(*args):
        seen.append((args[12], args[13]))
        return real(*args)

    x = make_inputs(1, 4, 4, 40, 0, True, False, False, False, torch.float32, seed=4)
    for bl, ck in ((None, None), (16, None), (None, 3), (2, 5)):
        ts._SelectiveScanFn.apply = spy
        try:
            triton_fn(bl, ck)(x, False, False)
        finally:
            ts._SelectiveScanFn.apply = real
        f, b = seen[-1]
        assert f.T * f.CK == b.BL * b.CK, (bl, ck, f, b)
        if bl is not None:
            assert f.T == b.BL == bl


# Segment-parallel backward (KERNEL_NOTES v8): (L, BL, CK, forward segments, backward segments,
# N, D, groups, has_z, has_bias, softplus, last, h0). Time segments of whole checkpoint
# segments, a partial last one; with and without the gate (dy = dout * silu(z) in pass 1), a
# final-state gradient (the seed of the last segment) and an initial state (dh0 from segment 0)
BWD_SEG_CASES = [
    (37, 4, 2, 1, 3, 4, 6, 2, True, True, True, True, True),
    (50, 2, 4, 2, 4, 3, 5, 0, False, True, True, False, False),
    (70, 16, 1, 1, 5, 8, 4, 0, True, False, False, True, False),
    (29, 2, 2, 1, 8, 5, 3, 3, True, True, True, True, True),
]


@pytest.mark.parametrize("case", BWD_SEG_CASES,
                         ids=[f"L{c[0]}-BL{c[1]}-CK{c[2]}-Sb{c[4]}" for c in BWD_SEG_CASES])
def test_segment_parallel_backward_matches_float64(case):
    """Pass 1 (each segment's local adjoint), the reverse combine and the per-segment backward
    give every gradient of the float64 recurrence."""
    L, BL, CK, S, Sb, N, D, G, has_z, has_bias, softplus, last, h0 = case
    n_ck = ts._cdiv(L, BL * CK)
    assert ts._cdiv(n_ck, ts._cdiv(n_ck, Sb)) > 1  # really more than one backward segment
    x = make_inputs(2, D, N, L, G, True, has_z, has_bias, h0, torch.float32, seed=300 + L + Sb,
                    softplus=softplus)
    out, _, grads = run_with_grads(triton_fn(BL, CK, segments=S, bwd_segments=Sb), x,
                                   softplus, last)
    rout, _, rgrads = run_with_grads(ref_fn(torch.float64), x, softplus, last,
                                     dtype_ref=torch.float64)
    assert rel_err(out, rout) < 1e-5
    assert_grads_match(x, grads, rgrads)


@pytest.fixture
def h100_props(monkeypatch):
    """torch.cuda.get_device_properties answers as for an H100 (132 SMs), on any machine."""
    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: Props())


def test_backward_segments_only_when_the_gpu_would_idle(h100_props):
    cfg = ts.pick_config(16, 512, True)
    assert ts.pick_bwd_segments(1, 512, 1, 10_000, cfg, torch.device("cpu")) == 1
    gpu = torch.device("cuda")
    # batch 1, D 512: 4 programs -> 264 segments for 8 per SM, capped by BWD_MIN_SEG_STEPS
    assert ts.pick_bwd_segments(1, 512, 1, 65536, cfg, gpu) == 65536 // ts.BWD_MIN_SEG_STEPS
    assert ts.pick_bwd_segments(1, 512, 1, 10626, cfg, gpu) == 10626 // ts.BWD_MIN_SEG_STEPS
    assert ts.pick_bwd_segments(1, 512, 1, 300, cfg, gpu) == 1
    # the issue-6 shape: 96 programs -> 11
    big = ts.pick_config(16, 1536, True)
    assert ts.pick_bwd_segments(8, 1536, 1, 16384, big, gpu) == 11
    assert ts.pick_bwd_segments(16, 1536, 1, 16384, big, gpu) == 6
    assert ts.pick_bwd_segments(24, 1536, 1, 16384, big, gpu) == 1  # 288 of 1056: enough


def test_segments_are_only_picked_when_the_gpu_would_idle(h100_props):
    cfg = ts.pick_fwd_config(512)
    cpu = torch.device("cpu")
    assert ts.pick_segments(1, 512, 1, 10_000, cfg, cpu) == 1  # the interpreter / CPU: one pass
    gpu = torch.device("cuda")
    # batch 1, D 512: 16 warps for 132 SMs -> 396 segments for 48 warps per SM, capped by
    # MIN_SEG_STEPS
    assert ts.pick_segments(1, 512, 1, 65536, cfg, gpu) == 396
    assert ts.pick_segments(1, 512, 1, 10626, cfg, gpu) == 10626 // ts.MIN_SEG_STEPS
    assert ts.pick_segments(1, 512, 1, 200, cfg, gpu) == 1  # too short to cut
    # the issue-6 shape: 384 warps -> 17 segments
    big = ts.pick_fwd_config(1536)
    assert ts.pick_segments(8, 1536, 1, 16384, big, gpu) == 17
    assert ts.pick_segments(24, 1536, 1, 16384, big, gpu) == 6
    # a quarter of the target already: one pass
    assert ts.pick_segments(64, 1536, 1, 16384, big, gpu) == 1


def test_bf16_error_within_twice_pytorch_fp32():
    """bf16 inputs: our error vs the float64 truth is at most ~2x that of an fp32 PyTorch scan."""
    L, N, D = 70, 16, 8
    x = make_inputs(2, D, N, L, 2, True, True, True, False, torch.bfloat16, seed=7)
    out, _, grads = run_with_grads(triton_fn(16), x, True, False)
    tout, _, tgrads = run_with_grads(ref_fn(torch.float32), x, True, False)
    rout, _, rgrads = run_with_grads(ref_fn(torch.float64), x, True, False,
                                     dtype_ref=torch.float64)
    assert out.dtype == torch.bfloat16
    e_ours, e_torch = rel_err(out, rout), rel_err(tout, rout)
    assert e_ours <= 2 * e_torch + 1e-6, (e_ours, e_torch)
    assert e_ours < 1e-2
    for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"):
        assert grads[k].dtype == x[k].dtype, k
        e_ours, e_torch = rel_err(grads[k], rgrads[k]), rel_err(tgrads[k], rgrads[k])
        assert e_ours <= 2 * e_torch + 1e-6, (k, e_ours, e_torch)


def test_no_grad_forward_and_non_contiguous_inputs():
    """Inference skips the checkpoints; inputs with a strided time axis are handled."""
    L, N, D = 33, 8, 8
    x = make_inputs(2, D, N, L, 0, True, True, True, False, torch.float32, seed=3)
    u_t = x["u"].transpose(1, 2).contiguous().transpose(1, 2)  # time axis not contiguous
    assert u_t.stride(-1) != 1
    with torch.no_grad():
        out, state = ts.selective_scan_triton(u_t, x["delta"], x["A"], x["B"], x["C"], x["D"],
                                              x["z"], x["delta_bias"], True, True, block_l=16)
    rout, rstate = ref_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                            x["delta_bias"], True)
    assert rel_err(out, rout) < 1e-5 and rel_err(state, rstate) < 1e-5


def test_state_continuation_matches_one_pass():
    """Scanning [0, 20) then [20, 45) from the returned state equals one pass over [0, 45)."""
    x = make_inputs(2, 4, 8, 45, 0, True, False, True, False, torch.float32, seed=11)
    full, hfull = ts.selective_scan_triton(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"],
                                           None, x["delta_bias"], True, True, block_l=16)
    s1 = slice(0, 20)
    s2 = slice(20, 45)
    a, h1 = ts.selective_scan_triton(x["u"][..., s1], x["delta"][..., s1], x["A"],
                                     x["B"][..., s1], x["C"][..., s1], x["D"], None,
                                     x["delta_bias"], True, True, block_l=16)
    b, h2 = ts.selective_scan_triton(x["u"][..., s2], x["delta"][..., s2], x["A"],
                                     x["B"][..., s2], x["C"][..., s2], x["D"], None,
                                     x["delta_bias"], True, True, initial_state=h1, block_l=16)
    assert rel_err(torch.cat([a, b], -1), full) < 1e-6
    assert rel_err(h2, hfull) < 1e-6


def test_dispatcher_reaches_triton():
    scan = pytest.importorskip("alignmamba.ssm.scan")
    x = make_inputs(2, 4, 4, 9, 0, True, True, True, False, torch.float32, seed=5)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True)
    got = scan.selective_scan(*args, backend="triton")
    want, _ = ref_scan(*args)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("bad", ["A3d", "Bshape", "groups", "Dshape", "complexA"])
def test_bad_arguments_raise_alignmamba_error(bad):
    x = make_inputs(1, 4, 4, 5, 0, True, False, False, False, torch.float32, seed=1)
    if bad == "A3d":
        x["A"] = x["A"][None]
    elif bad == "Bshape":
        x["B"] = x["B"][..., :3]
    elif bad == "groups":
        x["B"] = x["B"][:, None].expand(1, 3, 4, 5)
        x["C"] = x["C"][:, None].expand(1, 3, 4, 5)
    elif bad == "Dshape":
        x["D"] = x["D"][:3]
    elif bad == "complexA":
        x["A"] = x["A"].to(torch.complex64)
    with pytest.raises(AlignMambaError, match="selective_scan_triton"):
        ts.selective_scan_triton(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"])


def test_bwd_kernel_choice_is_checked(monkeypatch):
    """An unknown backward kernel fails at the call; a forced CUDA backward that cannot run
    (here: no CUDA tensors, or N > 16) fails with the reason instead of silently running
    another kernel; the environment variable is checked the same way."""
    # N = 20 > 16: the CUDA backward cannot run it on a GPU either
    x = make_inputs(1, 4, 20, 9, 0, True, False, False, False, torch.float32, seed=2)
    with pytest.raises(AlignMambaError, match="bwd_kernel='bogus'"):
        triton_fn(bwd_kernel="bogus")(x, True, False)
    leaves = {k: (v.clone().requires_grad_(True) if v is not None else None) for k, v in x.items()}
    out = triton_fn(bwd_kernel="cuda")(leaves, True, False)
    with pytest.raises(AlignMambaError, match="bwd_kernel='cuda' cannot run: (N=20|not a CUDA)"):
        out.sum().backward()
    monkeypatch.setenv(ts.ENV_BWD, "fast")
    out = triton_fn()(leaves, True, False)
    with pytest.raises(AlignMambaError, match="ALIGNMAMBA_SCAN_BWD"):
        out.sum().backward()
    big = torch.zeros(1, 4, 9)
    ok, why = ts.cuda_scan.bwd_supported(big, big, None, 32, 64)
    assert not ok and "N=32" in why


def test_fwd_kernel_choice_is_checked(monkeypatch):
    """The forward's kernel choice fails the same ways, at the call (the forward runs there)."""
    x = make_inputs(1, 4, 20, 9, 0, True, False, False, False, torch.float32, seed=2)
    with pytest.raises(AlignMambaError, match="fwd_kernel='bogus'"):
        triton_fn(fwd_kernel="bogus")(x, True, False)
    with pytest.raises(AlignMambaError, match="fwd_kernel='cuda' cannot run: (N=20|not a CUDA)"):
        triton_fn(fwd_kernel="cuda")(x, True, False)
    monkeypatch.setenv(ts.ENV_FWD, "fast")
    with pytest.raises(AlignMambaError, match="ALIGNMAMBA_SCAN_FWD='fast' is not one of"):
        triton_fn()(x, True, False)
    monkeypatch.setenv(ts.ENV_FWD, "cuda")  # the error names where the choice came from
    with pytest.raises(AlignMambaError, match="ALIGNMAMBA_SCAN_FWD='cuda' cannot run"):
        triton_fn()(x, True, False)
    with pytest.raises(AlignMambaError, match="fwd_kernel='cuda' cannot run"):
        triton_fn(fwd_kernel="cuda")(x, True, False)  # an explicit argument wins over the variable
    monkeypatch.setenv(ts.ENV_FWD, "triton")  # forced Triton runs anywhere Triton does
    assert triton_fn()(x, True, False).shape == (1, 4, 9)
    big = torch.zeros(1, 4, 9, dtype=torch.float16)
    ok, why = ts.cuda_scan.fwd_supported(big, big.float(), None, 16, None)
    assert not ok and "dtypes" in why
    ok, why = ts.cuda_scan.fwd_supported(big, big, None, 16, 32)
    assert not ok and "every 32 steps" in why


@pytest.mark.parametrize("which", ["fwd", "bwd"])
@pytest.mark.parametrize("forced", [False, True])
def test_cuda_kernel_failure_falls_back_unless_forced(which, forced, monkeypatch):
    """A CUDA kernel that fails to compile or launch (here: simulated) is a one-time warning
    and the Triton kernel's exact results in auto mode, and an error when it was forced."""
    from alignmamba.ssm import nvrtc

    def broken(*args, **kw):
        raise nvrtc.NvrtcError(f"NVRTC compile of ssm_{which} failed: simulated")

    monkeypatch.setattr(ts, "_CUDA_BROKEN", {"fwd": set(), "bwd": set()})
    monkeypatch.setattr(ts.cuda_scan, f"{which}_supported", lambda *a: (True, ""))
    monkeypatch.setattr(ts.cuda_scan, f"selective_scan_{which}_cuda", broken)
    warned: list[str] = []
    monkeypatch.setattr(ts, "_warn_once", lambda key, msg: warned.append(msg))  # no dedupe
    x = make_inputs(2, 6, 4, 40, 0, True, True, True, True, torch.float32, seed=9)
    kw = {f"{which}_kernel": "cuda" if forced else None}
    fn = triton_fn(16, 2, **kw)
    pname = "forward" if which == "fwd" else "backward"
    if forced:
        with pytest.raises(AlignMambaError, match=f"CUDA {pname} failed: NVRTC compile"):
            run_with_grads(fn, x, True, True)
        return
    out, last, grads = run_with_grads(fn, x, True, True)
    rout, rlast, rgrads = run_with_grads(ref_fn(torch.float64), x, True, True,
                                         dtype_ref=torch.float64)
    assert rel_err(out, rout) < 1e-5 and rel_err(last, rlast) < 1e-5
    assert_grads_match(x, grads, rgrads)
    # (on a GPU the other pass may warn too: this tile's 32-step checkpoints don't fit it)
    failed = [w for w in warned if "failed" in w]
    assert len(failed) == 1 and f"CUDA scan {pname} failed" in failed[0]
    assert f"using the slower Triton {pname}" in failed[0]
    assert len(ts._CUDA_BROKEN[which]) == 1  # not tried again on this device
    run_with_grads(fn, x, True, True)
    assert len([w for w in warned if "failed" in w]) == 1


@pytest.fixture
def deterministic(monkeypatch):
    """torch.use_deterministic_algorithms(True) for one test (cuBLAS's fixed workspace with it)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])


def test_deterministic_mode_replaces_the_triton_backward(deterministic, monkeypatch):
    """Under torch.use_deterministic_algorithms the Triton backward (dB, dC summed by atomics)
    is not launched: autograd through the PyTorch scan gives every gradient, with a warning."""
    monkeypatch.setattr(ts, "_launch_bwd", lambda *a: pytest.fail("the Triton backward ran"))
    warned: list[str] = []
    monkeypatch.setattr(ts, "_warn_once", lambda key, msg: warned.append(msg))
    x = make_inputs(2, 6, 4, 40, 2, True, True, True, True, torch.float32, seed=5)
    out, last, grads = run_with_grads(triton_fn(16, 2, bwd_kernel="triton"), x, True, True)
    rout, rlast, rgrads = run_with_grads(ref_fn(torch.float64), x, True, True,
                                         dtype_ref=torch.float64)
    assert rel_err(out, rout) < 1e-5 and rel_err(last, rlast) < 1e-5
    assert_grads_match(x, grads, rgrads)
    msgs = [w for w in warned if "deterministic" in w]
    assert len(msgs) == 1 and "PyTorch scan's backward" in msgs[0], warned


def test_cuda_fwd_segments(h100_props):
    """The CUDA forward cuts time only when its warps leave sub-partitions idle: none at the
    issue shape (1536 warps for 528 sub-partitions), many for batch 1 x 512 channels, and
    never below two checkpoints per segment."""
    cs = ts.cuda_scan
    assert cs.pick_fwd_segments(1, 512, 1, 65536, torch.device("cpu")) == 1
    gpu = torch.device("cuda")
    assert cs.pick_fwd_segments(8, 1536, 1, 16384, gpu) == 1
    assert cs.pick_fwd_segments(1, 512, 1, 100, gpu) == 1  # 2 checkpoints: one segment
    assert cs.pick_fwd_segments(1, 512, 1, 256, gpu) == 2  # 4 checkpoints: 2 segments at most
    s = cs.pick_fwd_segments(1, 512, 1, 65536, gpu)
    assert 8 <= s <= 64
    assert cs.pick_fwd_segments(1, 512, 1, 1024, gpu) == 8  # 16 checkpoints, 2 each


def test_cuda_bwd_blocks_per_sm():
    """v9: 255 registers a thread leave 8 warps per SM: one block of 128 or 96 channels, two of
    64. v11: 168 registers and under 75 KB of shared memory leave 3 blocks of 4 warps."""
    cs = ts.cuda_scan
    assert [cs.blocks_per_sm(c) for c in (128, 96, 64)] == [1, 1, 2]
    assert cs.smem_bytes(128) == 2 * 8 * 2 * 256 * 16 + 2 * 64 * 16 * 4 + 2 * 8 * 8 * 32 * 4
    assert cs.blocks_per_sm4() == 3 and 3 * (cs.smem_bytes4() + 1024) <= 228 * 1024


def test_cuda_bwd_segments_balance_waves(h100_props):
    """The v9 backward runs one block per SM: S time segments are chosen to minimise
    waves / S (the slowest SM's share of the sequence), at least 4 checkpoints each."""
    cs = ts.cuda_scan
    assert cs.pick_segments(8, 1536, 1, 16384, torch.device("cpu"), 9) == 1
    gpu = torch.device("cuda")
    assert cs.pick_segments(1, 512, 1, 200, gpu, 9) == 1  # 4 checkpoints: cannot cut
    for bsz, dim, length in ((8, 1536, 16384), (1, 512, 10626), (32, 1536, 2048)):
        s = cs.pick_segments(bsz, dim, 1, length, gpu, 9)
        blocks = bsz * dim // 128
        waves = -(-blocks * s // 132)
        # no other count does better by more than the 3% that a segment must win
        for other in range(1, length // 256 + 1):
            assert -(-blocks * other // 132) / other >= 0.97 * waves / s - 1e-12, (s, other)


def test_cuda_bwd4_segments_skip_the_seeds_pass(h100_props):
    """The v11 backward (3 blocks of 32 channels per SM, 396 on an H100): the issue shape's 384
    blocks fit one wave, so no time segments and no seeds pass; batch 1 x 512 channels (16
    blocks) is cut until the blocks fill the SMs; a cut must pay for the seeds pass."""
    cs = ts.cuda_scan
    gpu = torch.device("cuda")
    assert cs.pick_segments(8, 1536, 1, 16384, gpu, 11) == 1
    assert cs.pick_segments(1, 512, 1, 65536, gpu, 11) == 24  # 16 x 24 = 384 of 396 slots
    assert cs.pick_segments(1, 512, 1, 200, gpu, 11) == 1
    assert cs.pick_segments(16, 1536, 1, 16384, gpu, 11) == 1  # 768 blocks: 2 full waves
    # 576 blocks: a second wave 45% full at S = 1 (cost 2); S = 11 gives 16 full waves,
    # 1.25 x 16 / 11 = 1.82 with the seeds pass
    assert cs.pick_segments(12, 1536, 1, 16384, gpu, 11) == 11


# cases of the CUDA kernels against float64:
# (B, D, N, L, G, has_D, has_z, has_bias, softplus, last, h0, time segments)
CUDA_CASES = [
    (2, 200, 16, 300, 2, True, True, True, True, True, True, None),  # 100-channel groups
    (2, 256, 5, 256, 0, True, False, False, False, False, False, 1),  # N padded to 16
    (1, 384, 16, 1000, 0, False, True, True, True, True, False, 3),  # time segments
    (3, 130, 16, 77, 0, True, True, False, True, False, True, 1),  # a block of 2 channels
    (1, 128, 12, 1030, 4, True, True, True, True, True, True, 4),  # 32-channel groups
    # 16-byte loads (L % 8 == 0) and a partial last checkpoint segment: v11 once read and wrote
    # past the rows' end here (KERNEL_NOTES v11)
    (2, 96, 16, 1000, 0, True, True, True, True, False, False, None),
]


def _case_id(c: tuple) -> str:
    return f"B{c[0]}-D{c[1]}-N{c[2]}-L{c[3]}-G{c[4]}-S{c[11]}"


@pytest.mark.skipif(not CUDA, reason="the CUDA backward (NVRTC) needs a CUDA device")
@pytest.mark.parametrize("case", CUDA_CASES, ids=_case_id)
@pytest.mark.parametrize("version", [11, 9], ids=["v11", "v9"])
def test_cuda_backward_matches_float64(case, version, monkeypatch):
    """The CUDA backward kernels (KERNEL_NOTES v9 and v11): every gradient equals the float64
    recurrence's; lengths not a multiple of 8 (scalar loads) and of 64 (a partial checkpoint
    segment), channel blocks with idle lanes, padded states, seeds, h0, final-state grads."""
    bsz, D, N, L, G, has_d, has_z, has_bias, softplus, last, h0, Sb = case
    monkeypatch.setattr(ts.cuda_scan, "BWD_VERSION", version)
    calls = []
    real = ts.cuda_scan.selective_scan_bwd_cuda
    monkeypatch.setattr(ts.cuda_scan, "selective_scan_bwd_cuda",
                        lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    x = make_inputs(bsz, D, N, L, G, has_d, has_z, has_bias, h0, torch.float32, seed=D + L,
                    softplus=softplus)
    out, _, grads = run_with_grads(triton_fn(bwd_segments=Sb, bwd_kernel="cuda"), x,
                                   softplus, last)
    rout, _, rgrads = run_with_grads(ref_fn(torch.float64), x, softplus, last,
                                     dtype_ref=torch.float64)
    assert len(calls) == 1 and (Sb is None or calls[0] == Sb)
    assert rel_err(out, rout) < 1e-5
    assert_grads_match(x, grads, rgrads)


@pytest.mark.skipif(not CUDA, reason="the CUDA backward (NVRTC) needs a CUDA device")
@pytest.mark.parametrize("case", [CUDA_CASES[i] for i in (0, 2, 4)], ids=_case_id)
def test_cuda_deterministic_backward(case, deterministic, monkeypatch):
    """Under torch.use_deterministic_algorithms the CUDA backward is v11 with each channel
    block's dB, dC in its own slice, summed in a fixed order (even where v9 is the default):
    every gradient equals float64's and a second run repeats it bitwise."""
    bsz, D, N, L, G, has_d, has_z, has_bias, softplus, last, h0, Sb = case
    monkeypatch.setattr(ts.cuda_scan, "BWD_VERSION", 9)
    calls = []
    real = ts.cuda_scan.selective_scan_bwd_cuda
    monkeypatch.setattr(ts.cuda_scan, "selective_scan_bwd_cuda",
                        lambda *a, **k: calls.append(k) or real(*a, **k))
    x = make_inputs(bsz, D, N, L, G, has_d, has_z, has_bias, h0, torch.float32, seed=D + L,
                    softplus=softplus)
    fn = triton_fn(bwd_segments=Sb, bwd_kernel="cuda")
    runs = [run_with_grads(fn, x, softplus, last)[2] for _ in range(2)]
    _, _, rgrads = run_with_grads(ref_fn(torch.float64), x, softplus, last,
                                  dtype_ref=torch.float64)
    assert calls == [{"version": 11, "deterministic": True}] * 2
    assert_grads_match(x, runs[0], rgrads)
    for k in GRAD_NAMES:
        if x[k] is not None:
            assert torch.equal(runs[0][k], runs[1][k]), k


@pytest.mark.skipif(not CUDA, reason="the CUDA forward (NVRTC) needs a CUDA device")
@pytest.mark.parametrize("case", CUDA_CASES + [
    (1, 64, 16, 4100, 0, True, True, True, True, True, True, None),  # auto segments
], ids=_case_id)
@pytest.mark.parametrize("grad", [True, False], ids=["train", "infer"])
def test_cuda_forward_matches_float64(case, grad, monkeypatch):
    """The CUDA forward kernel (KERNEL_NOTES v10): output and final state equal the float64
    recurrence's; with gradients, its checkpoints feed the backward, so every gradient is
    checked too. Lengths not a multiple of 8 (scalar loads) or 32 (a partial chunk), warps
    with idle lanes, padded states, segments (local pass + combine), h0."""
    bsz, D, N, L, G, has_d, has_z, has_bias, softplus, last, h0, S = case
    calls = []
    real = ts.cuda_scan.selective_scan_fwd_cuda
    monkeypatch.setattr(ts.cuda_scan, "selective_scan_fwd_cuda",
                        lambda *a: calls.append(a[14]) or real(*a))
    x = make_inputs(bsz, D, N, L, G, has_d, has_z, has_bias, h0, torch.float32, seed=D + L + 1,
                    softplus=softplus)
    fn = triton_fn(segments=S, fwd_kernel="cuda")
    rout, rlast, rgrads = run_with_grads(ref_fn(torch.float64), x, softplus, last,
                                         dtype_ref=torch.float64)
    if grad:
        out, st, grads = run_with_grads(fn, x, softplus, last)
        assert_grads_match(x, grads, rgrads)
    else:
        with torch.no_grad():
            res = fn(x, softplus, last)
        out, st = res if last else (res, None)
    assert len(calls) in (1, 2) and (S is None or calls[-1] == S)
    assert rel_err(out, rout) < 1e-5
    if last:
        assert rel_err(st, rlast) < 1e-5


@pytest.mark.skipif(not CUDA, reason="the CUDA forward (NVRTC) needs a CUDA device")
@pytest.mark.parametrize("opts", [("GS=8",), ("MINB=2", "GS=8"), ("MINB=4",)])
def test_cuda_forward_variants_match_float64(opts):
    """The forward's compile-time variants that benchmarks sweep (steps per pipelined group,
    register budget) compute the same scan: output and last state against float64."""
    x = make_inputs(2, 200, 16, 1000, 2, True, True, True, True, torch.float32, seed=31)
    Bg, Cg, _ = ts._check(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                          x["delta_bias"], x["initial_state"])
    cf = ts.pick_fwd_config(100)
    out, last, ckpt = ts._fwd(x["u"], x["delta"], x["A"], Bg, Cg, x["D"], x["z"],
                              x["delta_bias"], x["initial_state"], True, True, True, cf, 1,
                              "cuda", opts)
    rout, rlast = ref_fn(torch.float64)(x, True, True)
    assert rel_err(out, rout) < 1e-5 and rel_err(last, rlast) < 1e-5
    _, _, ckpt0 = ts._fwd(x["u"], x["delta"], x["A"], Bg, Cg, x["D"], x["z"], x["delta_bias"],
                          x["initial_state"], True, True, True, cf, 1, "cuda")
    assert rel_err(ckpt, ckpt0) < 1e-5  # the checkpoints the backward reads


@pytest.mark.skipif(not CUDA, reason="the CUDA forward (NVRTC) needs a CUDA device")
@pytest.mark.parametrize("case", CUDA_CASES, ids=_case_id)
def test_cuda_forward_packed_bf16_rows_are_exact(case, monkeypatch):
    """bf16 B and C go to the forward packed (``rows_bc16``, the BC16 build): output, final
    state and checkpoints are bitwise those of the fp32 rows ("BC16=0"), through the
    segmented forward's local pass as well."""
    bsz, D, N, L, G, has_d, has_z, has_bias, softplus, _last, h0, S = case
    x = make_inputs(bsz, D, N, L, G, has_d, has_z, has_bias, h0, torch.bfloat16, seed=D + L + 2,
                    softplus=softplus)
    Bg, Cg, _ = ts._check(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                          x["delta_bias"], x["initial_state"])
    assert Bg.dtype == Cg.dtype == torch.bfloat16
    seen = []
    real = ts.cuda_scan.selective_scan_fwd_cuda
    monkeypatch.setattr(ts.cuda_scan, "selective_scan_fwd_cuda",
                        lambda *a: seen.append(a[3].dtype) or real(*a))
    cf = ts.pick_fwd_config(D // max(G, 1))
    res = [ts._fwd(x["u"], x["delta"], x["A"], Bg, Cg, x["D"], x["z"], x["delta_bias"],
                   x["initial_state"], softplus, True, True, cf, S, "cuda", opts)
           for opts in ((), ("BC16=0",))]
    n = len(seen) // 2
    assert seen == [torch.int32] * n + [torch.float32] * n
    for packed, plain in zip(res[0], res[1]):
        assert torch.equal(packed, plain)
    assert res[0][0].abs().max() > 0 and res[0][2].abs().max() > 0  # not a vacuous equality


@pytest.mark.skipif(not CUDA, reason="the CUDA seeds kernel (NVRTC) needs a CUDA device")
@pytest.mark.parametrize("dtype,length,has_z,groups", [
    (torch.float32, 1000, True, 0),    # a partial last chunk, scalar loads
    (torch.float32, 4096, False, 2),   # whole chunks, 16-byte loads, groups
    (torch.bfloat16, 2600, True, 0),
])
def test_cuda_seeds_match_triton(dtype, length, has_z, groups):
    """The backward's seeds pass (each time segment's local adjoint and shifted delta sum,
    then the reverse combine): CUDA (``ssm_adj_local``) against the Triton kernel."""
    x = make_inputs(2, 96, 16, length, groups, True, has_z, True, False, dtype, seed=length)
    _, Cg, _ = ts._check(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                         x["delta_bias"], None)
    dout = torch.randn_like(x["u"])
    dlast = torch.randn(2, 96, 16, device=DEV)
    At = x["A"].t().contiguous()
    args = (dout, dlast, x["delta"], x["A"], At, ts._prep_bc(Cg), x["z"], x["delta_bias"], True,
            64, 5)
    seeds_c, S, ck = ts._bwd_seeds(*args, kernel="cuda")
    seeds_t, S_t, ck_t = ts._bwd_seeds(*args)
    assert (S, ck) == (S_t, ck_t) and S >= 4
    assert rel_err(seeds_c, seeds_t) < 1e-5


@pytest.mark.skipif(not CUDA, reason="the CUDA backward (NVRTC) needs a CUDA device")
@pytest.mark.parametrize("ch", [64, 96])
def test_cuda_backward_other_block_widths(ch, monkeypatch):
    """v9 blocks of 64 or 96 channels (benchmarks/bench_scan.py --bwd-ch) give the same
    gradients: 100-channel groups leave a partly idle block either way."""
    monkeypatch.setattr(ts.cuda_scan, "BWD_VERSION", 9)
    monkeypatch.setattr(ts.cuda_scan, "CHANNELS_PER_BLOCK", ch)
    x = make_inputs(2, 200, 16, 300, 2, True, True, True, True, torch.float32, seed=ch)
    out, _, grads = run_with_grads(triton_fn(bwd_kernel="cuda"), x, True, True)
    rout, _, rgrads = run_with_grads(ref_fn(torch.float64), x, True, True,
                                     dtype_ref=torch.float64)
    assert rel_err(out, rout) < 1e-5
    assert_grads_match(x, grads, rgrads)


@pytest.mark.skipif(not CUDA, reason="compiled-kernel size check needs CUDA; the interpreter "
                    "covers the same code paths at small sizes above")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fwd_kernel,bwd_kernel", [("cuda", "cuda"), ("triton", "cuda"),
                                                   ("cuda", "triton"), ("triton", "triton")])
def test_cuda_default_config_large(dtype, fwd_kernel, bwd_kernel):
    """Default tiles and checkpoint spacing at a realistic width on the GPU, with either
    forward and either backward kernel (each backward walks the other forward's checkpoints)."""
    x = make_inputs(2, 256, 16, 1000, 0, True, True, True, False, dtype, seed=21)
    out, _, grads = run_with_grads(triton_fn(bwd_kernel=bwd_kernel, fwd_kernel=fwd_kernel), x,
                                   True, False)
    tout, _, tgrads = run_with_grads(ref_fn(torch.float32), x, True, False)
    rout, _, rgrads = run_with_grads(ref_fn(torch.float64), x, True, False,
                                     dtype_ref=torch.float64)
    tol = 1e-5 if dtype == torch.float32 else None
    for k in ("out",) + tuple(k for k in GRAD_NAMES if x[k] is not None):
        a, t, r = (out, tout, rout) if k == "out" else (grads[k], tgrads[k], rgrads[k])
        e_ours, e_torch = rel_err(a, r), rel_err(t, r)
        if tol is not None:
            assert e_ours < tol, (k, e_ours)
        else:
            assert e_ours <= 2 * e_torch + 1e-6, (k, e_ours, e_torch)


def test_cuda_fwd_options_are_checked():
    """Compile-time settings of scan_fwd.cu (benchmarks sweep them) must name a known macro and
    an integer; anything else fails before NVRTC sees it."""
    u = torch.randn(1, 32, 64)
    A = -torch.rand(32, 16)
    bc = torch.randn(1, 1, 16, 64, dtype=torch.bfloat16)
    rows = ts.cuda_scan.rows16(bc)
    assert rows.dtype == torch.float32 and rows.is_contiguous()
    assert torch.equal(rows, bc.transpose(-1, -2).float())
    padded = ts.cuda_scan.rows16(bc[:, :, :5])  # N = 5: states 5..15 are zero
    assert torch.equal(padded[..., :5], rows[..., :5]) and not padded[..., 5:].any()
    # bf16 B, C packed for the BC16 build: word n of a row = B_n (low half) | C_n (high half)
    cc = torch.randn(1, 1, 5, 64, dtype=torch.bfloat16)
    words = ts.cuda_scan.rows_bc16(bc[:, :, :5], cc)
    assert words.dtype == torch.int32 and words.shape == (1, 1, 64, 16) and words.is_contiguous()
    lo = (words << 16).view(torch.float32)
    hi = (words & -65536).view(torch.float32)
    assert torch.equal(lo, padded) and torch.equal(hi[..., :5], cc.transpose(-1, -2).float())
    assert not hi[..., 5:].any()
    full = ts.cuda_scan.rows_bc16(bc, -bc)  # N = 16: no padding
    assert torch.equal((full << 16).view(torch.float32), rows)
    assert torch.equal((full & -65536).view(torch.float32), -rows)
    for bad in ("EMU=1", "MINB=x", "MINB"):
        with pytest.raises(ValueError, match="scan_fwd.cu option"):
            ts.cuda_scan.selective_scan_fwd_cuda(u, u, A, rows, rows, None, None, None, None,
                                                 True, torch.empty_like(u), None, None, None,
                                                 1, 64, (bad,))
    # the rows' layout is _fwd's option: only 0 (fp32 rows) or 1 (packed where exact)
    cf = ts.pick_fwd_config(32)
    for bad in ("BC16=2", "BC16=", "BC16=x"):
        with pytest.raises(ValueError, match=f"option '{bad}': BC16=0 or BC16=1 expected"):
            ts._fwd(u, u, A, bc, bc, None, None, None, None, True, False, False, cf, 1, "cuda",
                    (bad,))
