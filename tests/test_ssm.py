"""Tests for alignmamba.ssm: selective scan paths, dispatcher, Mamba block.

Ground truth is a float64 recurrence written here, independent of scan.py.

Tolerances (norm-wise relative error ||x - x64|| / ||x64||): float32 has unit roundoff
u = 2^-24 ~ 6e-8. The forward output at step t is a sum of at most t decayed terms, each
term carrying a few roundings, so the error is ~ sqrt(L) * few * u ~ 1e-6 for L = 130; we
allow 1e-5. Gradients of A, D and delta_bias additionally sum over the batch and all L
steps, and the reverse recurrence adds another L-term accumulation, so ~ sqrt(B * L) * L^0.5
* u ~ 1e-5; we allow 1e-4. float64 paths are held to 1e-10.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import alignmamba.ssm.scan as scan_mod
from alignmamba.errors import AlignMambaError
from alignmamba.ssm import (
    Mamba,
    MambaLayer,
    MambaStack,
    RMSNorm,
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
)

FWD_RTOL32 = 1e-5
GRAD_RTOL32 = 1e-4
RTOL64 = 1e-10
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().double()
    b = b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def scan64(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=False, h0=None):
    """Independent float64 selective scan: one explicit step per time index and channel group."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    bsz, dim, L = u.shape
    N = A.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias.double().view(1, dim, 1)
    if softplus:
        delta = torch.where(delta > 20, delta, torch.log1p(torch.exp(delta)))
    if B.dim() == 3:
        B = B.unsqueeze(1)
        C = C.unsqueeze(1)
    per_group = dim // B.shape[1]
    group_of = torch.tensor([d // per_group for d in range(dim)])
    Bd = B[:, group_of]  # (B, D, N, L)
    Cd = C[:, group_of]
    h = torch.zeros(bsz, dim, N, dtype=torch.float64) if h0 is None else h0.double()
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * Bd[..., t]
        ys.append((h * Cd[..., t]).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + D.double().view(1, dim, 1) * u
    if z is not None:
        z = z.double()
        y = y * z / (1 + torch.exp(-z))
    return y, h


def make_inputs(bsz, dim, N, L, groups, use_D, use_z, use_bias, softplus, dtype, seed,
                with_h0=False) -> dict[str, torch.Tensor | None]:
    """Random, never-zero inputs in Mamba's ranges (A < 0, effective delta > 0)."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    if softplus:
        delta = rn(bsz, dim, L, scale=0.7) - 2.0
    else:
        delta = (torch.rand(bsz, dim, L, generator=g, dtype=torch.float64) * 0.5 + 0.01).to(dtype)
    bc_shape = (bsz, N, L) if groups is None else (bsz, groups, N, L)
    A = -(torch.rand(dim, N, generator=g, dtype=torch.float64) * 3 + 0.2).to(dtype)
    out = {
        "u": rn(bsz, dim, L),
        "delta": delta,
        "A": A,
        "B": rn(*bc_shape),
        "C": rn(*bc_shape),
        "D": rn(dim) if use_D else None,
        "z": rn(bsz, dim, L) if use_z else None,
        "delta_bias": rn(dim, scale=0.3) if use_bias else None,
        "initial_state": rn(bsz, dim, N) if with_h0 else None,
    }
    return out


def leaf(inputs, dtype=None):
    return {k: (None if v is None else v.detach().clone().to(dtype or v.dtype).requires_grad_(True))
            for k, v in inputs.items()}


def run_and_grad(fn, inputs, softplus, g_out, g_state):
    x = leaf(inputs)
    out, last = fn(x, softplus)
    loss = (out * g_out).sum() + (last * g_state).sum()
    loss.backward()
    grads = {k: v.grad for k, v in x.items() if v is not None}
    return out, last, grads


def call_lib(func, **kw):
    def f(x, softplus):
        extra = {} if x["initial_state"] is None else {"initial_state": x["initial_state"]}
        return func(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                    softplus, True, **kw, **extra)
    return f


def call_64(x, softplus):
    return scan64(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                  softplus, x["initial_state"])


def compare_paths(L, groups, use_D, use_z, use_bias, softplus, with_h0=False, chunk=64, seed=0):
    bsz, dim, N = 2, 4, 3
    inp = make_inputs(bsz, dim, N, L, groups, use_D, use_z, use_bias, softplus, torch.float32,
                      seed, with_h0)
    g = torch.Generator().manual_seed(seed + 1)
    g_out = torch.randn(bsz, dim, L, generator=g, dtype=torch.float64)
    g_state = torch.randn(bsz, dim, N, generator=g, dtype=torch.float64)
    out64, last64, grads64 = run_and_grad(call_64, {k: None if v is None else v.double()
                                                   for k, v in inp.items()},
                                          softplus, g_out, g_state)
    results = {
        "ref": run_and_grad(call_lib(selective_scan_ref), inp, softplus, g_out.float(),
                            g_state.float()),
        "chunked": run_and_grad(call_lib(selective_scan_chunked, chunk_size=chunk), inp, softplus,
                                g_out.float(), g_state.float()),
    }
    for name, (out, last, grads) in results.items():
        assert out.dtype == torch.float32 and out.shape == (bsz, dim, L)
        assert last.shape == (bsz, dim, N)
        assert rel_err(out, out64) < FWD_RTOL32, (name, "out", rel_err(out, out64))
        assert rel_err(last, last64) < FWD_RTOL32, (name, "last_state", rel_err(last, last64))
        assert set(grads) == set(grads64)
        for k in grads64:
            assert grads[k] is not None, (name, k)
            assert grads[k].shape == inp[k].shape
            err = rel_err(grads[k], grads64[k])
            assert err < GRAD_RTOL32, (name, "grad", k, err)
    # the two float32 paths agree with each other as well as with float64
    assert rel_err(results["chunked"][0], results["ref"][0]) < FWD_RTOL32


# ------------------------------------------------------------------------------------------
# scan numerics
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L", [1, 7, 65, 130])
@pytest.mark.parametrize("groups", [None, 1, 2])
def test_scan_matches_float64_all_options(L, groups):
    compare_paths(L, groups, use_D=True, use_z=True, use_bias=True, softplus=True, seed=L)


@pytest.mark.parametrize("use_D,use_z,use_bias,softplus", [
    (False, False, False, False),
    (True, False, False, False),
    (False, True, False, True),
    (False, False, True, True),
    (True, True, True, False),
])
def test_scan_option_combinations(use_D, use_z, use_bias, softplus):
    compare_paths(65, 2, use_D, use_z, use_bias, softplus, seed=7)


@pytest.mark.parametrize("chunk", [1, 3, 16, 200])
def test_scan_chunk_sizes_and_initial_state(chunk):
    compare_paths(37, 2, True, True, True, True, with_h0=True, chunk=chunk, seed=3)


def test_chunked_float64_exact_and_gradcheck():
    inp = make_inputs(2, 4, 3, 11, 2, True, True, True, True, torch.float64, 5, with_h0=True)
    out, last = call_lib(selective_scan_chunked, chunk_size=4)(inp, True)
    out64, last64 = call_64(inp, True)
    assert out.dtype == torch.float64
    assert rel_err(out, out64) < RTOL64 and rel_err(last, last64) < RTOL64
    x = leaf(inp)
    keys = [k for k in NAMES if x[k] is not None]

    def f(*args):
        d = dict(zip(keys, args))
        return call_lib(selective_scan_chunked, chunk_size=4)(d, True)

    assert torch.autograd.gradcheck(f, tuple(x[k] for k in keys))


def test_half_precision_inputs_computed_in_float32():
    inp = make_inputs(2, 4, 3, 20, None, True, True, True, True, torch.float32, 9)
    half = {k: None if v is None else v.to(torch.bfloat16) for k, v in inp.items()}
    out, last = call_lib(selective_scan_chunked)(half, True)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    # same bf16 inputs, float64 math: only the final rounding to bf16 (2^-8) remains
    out64, _ = call_64(half, True)
    assert rel_err(out, out64) < 2 ** -8


def test_return_last_state_flag_and_default_chunk():
    inp = make_inputs(3, 8, 4, 50, 4, True, False, True, True, torch.float32, 11)
    args = [inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    out = selective_scan_chunked(*args, True)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 8, 50)
    out2, last = selective_scan_chunked(*args, True, True)
    assert torch.equal(out, out2)
    ref_out, ref_last = selective_scan_ref(*args, True, True)
    assert rel_err(out, ref_out) < FWD_RTOL32 and rel_err(last, ref_last) < FWD_RTOL32
    assert scan_mod.default_chunk_size(32, 256, 16) == 16
    assert scan_mod.default_chunk_size(1, 64, 16) == 256


def test_no_overflow_with_large_decay():
    # delta*A down to -2000: exp underflows to 0 as in the reference; nothing may become inf/nan
    inp = make_inputs(2, 4, 3, 70, None, True, True, False, False, torch.float32, 13)
    inp["delta"] = inp["delta"] * 200
    inp["A"] = inp["A"] * 3
    out, last = call_lib(selective_scan_chunked, chunk_size=16)(inp, False)
    out64, last64 = call_64(inp, False)
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    assert rel_err(out, out64) < FWD_RTOL32 and rel_err(last, last64) < FWD_RTOL32


def test_scan_shape_errors():
    inp = make_inputs(2, 4, 3, 5, None, False, False, False, False, torch.float32, 0)
    u, d, A, B, C = (inp[k] for k in ("u", "delta", "A", "B", "C"))
    with pytest.raises(AlignMambaError, match="G=3"):
        selective_scan_chunked(u, d, A, torch.randn(2, 3, 3, 5), torch.randn(2, 3, 3, 5))
    with pytest.raises(AlignMambaError, match="delta"):
        selective_scan_chunked(u, d[..., :4], A, B, C)
    with pytest.raises(AlignMambaError, match="initial_state"):
        selective_scan_chunked(u, d, A, B, C, initial_state=torch.randn(2, 4, 2))
    with pytest.raises(AlignMambaError, match="chunk_size"):
        selective_scan_chunked(u, d, A, B, C, chunk_size=0)


# ------------------------------------------------------------------------------------------
# dispatcher
# ------------------------------------------------------------------------------------------


def _spy(monkeypatch, name):
    calls = []
    real = getattr(scan_mod, name)

    def wrapper(*a, **k):
        calls.append(name)
        return real(*a, **k)

    monkeypatch.setattr(scan_mod, name, wrapper)
    return calls


def _args():
    inp = make_inputs(2, 4, 3, 9, 2, True, True, True, True, torch.float32, 21)
    return [inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]


def test_dispatch_cpu_backends(monkeypatch):
    monkeypatch.delenv(scan_mod.ENV_BACKEND, raising=False)
    args = _args()
    ref = selective_scan_ref(*args, True)
    ref_calls = _spy(monkeypatch, "selective_scan_ref")
    chk_calls = _spy(monkeypatch, "selective_scan_chunked")
    for backend, expect in ((None, "selective_scan_chunked"), ("auto", "selective_scan_chunked"),
                            ("torch", "selective_scan_chunked"), ("ref", "selective_scan_ref")):
        ref_calls.clear()
        chk_calls.clear()
        out = selective_scan(*args, True, backend=backend)
        assert (ref_calls + chk_calls) == [expect]
        assert rel_err(out, ref) < FWD_RTOL32
    # the environment variable replaces "auto" but not an explicit choice
    monkeypatch.setenv(scan_mod.ENV_BACKEND, "ref")
    ref_calls.clear()
    chk_calls.clear()
    selective_scan(*args, True)
    assert ref_calls == ["selective_scan_ref"] and chk_calls == []
    selective_scan(*args, True, backend="torch")
    assert chk_calls == ["selective_scan_chunked"]


def test_dispatch_errors(monkeypatch):
    monkeypatch.delenv(scan_mod.ENV_BACKEND, raising=False)
    args = _args()
    with pytest.raises(AlignMambaError, match="backend='cuda'"):
        selective_scan(*args, backend="cuda")
    monkeypatch.setenv(scan_mod.ENV_BACKEND, "fast")
    with pytest.raises(AlignMambaError, match="ALIGNMAMBA_SCAN_BACKEND='fast'"):
        selective_scan(*args)
    monkeypatch.delenv(scan_mod.ENV_BACKEND)
    monkeypatch.setattr(scan_mod, "_load_triton", lambda: None)
    with pytest.raises(AlignMambaError, match="triton") as e:
        selective_scan(*args, backend="triton")
    assert "\n" not in str(e.value)
    # mamba_ssm is either not installed or needs CUDA tensors: forcing it on CPU must fail
    with pytest.raises(AlignMambaError, match="mamba_ssm"):
        selective_scan(*args, backend="mamba_ssm")


def test_dispatch_triton_contract(monkeypatch):
    """The dispatcher hands Triton the same arguments, initial_state only when given."""
    monkeypatch.delenv(scan_mod.ENV_BACKEND, raising=False)
    seen = []

    def fake(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
             return_last_state=False, *, initial_state=None):
        seen.append(initial_state)
        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                      return_last_state, initial_state=initial_state)

    monkeypatch.setattr(scan_mod, "_load_triton", lambda: fake)
    args = _args()
    h0 = torch.randn(2, 4, 3)
    selective_scan(*args, True, backend="triton")
    selective_scan(*args, True, backend="triton", initial_state=h0)
    assert seen[0] is None and seen[1] is h0

    def fake_no_state(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
        return u

    monkeypatch.setattr(scan_mod, "_load_triton", lambda: fake_no_state)
    with pytest.raises(AlignMambaError, match="initial_state"):
        selective_scan(*args, True, backend="triton", initial_state=h0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dispatch_cuda_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv(scan_mod.ENV_BACKEND, raising=False)
    monkeypatch.setattr(scan_mod, "_load_triton", lambda: None)
    monkeypatch.setattr(scan_mod, "_load_mamba_ssm", lambda: None)
    monkeypatch.setattr(scan_mod, "_warned", {})
    args = [a.cuda() for a in _args()]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = selective_scan(*args, True)
        selective_scan(*args, True)
    assert sum("Triton" in str(w.message) for w in rec) == 1
    ref = selective_scan_ref(*[a.cpu() for a in args], True)
    assert out.is_cuda and rel_err(out.cpu(), ref) < FWD_RTOL32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dispatch_cuda_auto_prefers_triton(monkeypatch):
    monkeypatch.delenv(scan_mod.ENV_BACKEND, raising=False)
    calls = []

    def fake(*a, **k):
        calls.append(a[0].device.type)
        return selective_scan_chunked(*a, **k)

    monkeypatch.setattr(scan_mod, "_load_triton", lambda: fake)
    args = [a.cuda() for a in _args()]
    selective_scan(*args, True)
    assert calls == ["cuda"]
    # a forced mamba_ssm uses the real package when importable, else says it is missing
    if scan_mod._load_mamba_ssm() is None:
        with pytest.raises(AlignMambaError, match="mamba_ssm"):
            selective_scan(*args, True, backend="mamba_ssm")
    else:
        out = selective_scan(*args, True, backend="mamba_ssm")
        ref = selective_scan_ref(*[a.cpu() for a in args], True)
        assert rel_err(out.cpu(), ref) < FWD_RTOL32


# ------------------------------------------------------------------------------------------
# Mamba block
# ------------------------------------------------------------------------------------------


def test_mamba_init():
    torch.manual_seed(0)
    m = Mamba(40, d_state=8, d_conv=4, expand=2)
    assert m.dt_rank == math.ceil(40 / 16) == 3 and m.d_inner == 80
    expected = torch.log(torch.arange(1, 9, dtype=torch.float32)).expand(80, 8)
    assert m.A_log.shape == (80, 8) and torch.allclose(m.A_log, expected)
    assert torch.equal(m.D.data, torch.ones(80))
    assert m.A_log._no_weight_decay and m.D._no_weight_decay
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert dt.max() / dt.min() > 5  # drawn across the range, not a constant
    bound = m.dt_rank ** -0.5
    assert m.dt_proj.weight.abs().max() <= bound
    assert m.conv1d.weight.shape == (80, 1, 4) and m.x_proj.out_features == 3 + 16
    assert m.in_proj.bias is None and m.conv1d.bias is not None


def test_rmsnorm():
    n = RMSNorm(6, eps=1e-5)
    with torch.no_grad():
        n.weight.copy_(torch.randn(6))
    x = torch.randn(3, 5, 6)
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * n.weight
    assert torch.allclose(n(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rmsnorm_equals_its_reference_with_gradients(dtype):
    """RMSNorm (F.rms_norm where torch has it) against rms_norm_ref: values, d/dx, d/dweight."""
    from alignmamba.ssm.mamba import rms_norm_ref

    g = torch.Generator().manual_seed(1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x0 = (torch.randn(2, 9, 24, generator=g) * 3).to(dev, dtype)
    w0 = torch.randn(24, generator=g).to(dev)
    gy = torch.randn(2, 9, 24, generator=g).to(dev, dtype)
    res = []
    for fused in (True, False):
        n = RMSNorm(24).to(dev)
        with torch.no_grad():
            n.weight.copy_(w0)
        x = x0.clone().requires_grad_(True)
        if fused:
            y = n(x)
        else:
            xf = x.float() if dtype == torch.bfloat16 else x
            y = rms_norm_ref(xf, n.weight, n.eps).to(dtype)
        y.backward(gy)
        res.append((y, x.grad, n.weight.grad))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype]
    for got, want in zip(res[0], res[1]):
        if dtype == torch.bfloat16 and got.dtype == torch.bfloat16:
            # both sum in fp32 and round once to bf16: at most one bf16 step apart
            torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-3)
        else:
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def _rand_params(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("A_log", "dt_proj.bias")):
                continue  # keep Mamba's init ranges for the dynamics
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("cls", ["mamba", "stack"])
def test_padding_invariance(cls):
    torch.manual_seed(1)
    model = Mamba(16, d_state=4) if cls == "mamba" else MambaStack(16, 2, d_state=4, expand=2)
    _rand_params(model)
    model.eval()
    x = torch.randn(3, 12, 16)
    lengths = [12, 7, 1]
    mask = torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]
    out = model(x, mask)
    garbage = x.clone()
    garbage[~mask] = 1e3 * torch.randn(int((~mask).sum()), 16)
    out_g = model(garbage, mask)
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    assert torch.equal(out_g[~mask], torch.zeros_like(out_g[~mask]))
    for i, n in enumerate(lengths):
        alone = model(x[i:i + 1, :n])
        assert rel_err(out[i, :n], alone[0]) < 1e-5
        assert rel_err(out_g[i, :n], alone[0]) < 1e-5


@pytest.mark.parametrize("cls", ["mamba", "stack"])
def test_streaming_equals_single_pass(cls):
    torch.manual_seed(2)
    if cls == "mamba":
        model = Mamba(12, d_state=5, d_conv=4)
    else:
        model = MambaStack(12, 2, d_state=5, d_conv=3)
    _rand_params(model, seed=4)
    model.eval()
    x = torch.randn(2, 40, 12)
    full, full_state = model(x, return_state=True)
    pieces, state = [], None
    for a, b in ((0, 2), (2, 19), (19, 20), (20, 40)):  # pieces shorter than d_conv too
        y, state = model(x[:, a:b], state=state, return_state=True)
        pieces.append(y)
    stream = torch.cat(pieces, 1)
    assert rel_err(stream, full) < 1e-5
    flat = lambda s: torch.cat([t.flatten() for layer in (s if isinstance(s, list) else [s])
                                 for t in layer])
    assert rel_err(flat(state), flat(full_state)) < 1e-5
    # and the ssm state is the scan's own last state: a further piece continues the sequence
    x2 = torch.randn(2, 5, 12)
    cont, _ = model(x2, state=state, return_state=True)
    joint = model(torch.cat([x, x2], 1))
    assert rel_err(cont, joint[:, 40:]) < 1e-5


def test_mamba_backends_agree_forward_and_backward():
    torch.manual_seed(3)
    grads = {}
    outs = {}
    x0 = torch.randn(2, 23, 8)
    mask = torch.ones(2, 23, dtype=torch.bool)
    mask[1, 15:] = False
    for backend in ("ref", "torch"):
        torch.manual_seed(5)
        layer = MambaLayer(8, d_state=4, scan_backend=backend)
        _rand_params(layer, seed=6)
        x = x0.clone().requires_grad_(True)
        out = layer(x, mask)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs[backend] = out
        grads[backend] = {n: p.grad.clone() for n, p in layer.named_parameters()}
        grads[backend]["x"] = x.grad.clone()
    assert rel_err(outs["torch"], outs["ref"]) < FWD_RTOL32
    for name, g in grads["ref"].items():
        assert g.abs().sum() > 0, name
        assert rel_err(grads["torch"][name], g) < GRAD_RTOL32, name


def test_mamba_errors():
    m = Mamba(8, d_state=4)
    with pytest.raises(AlignMambaError, match="d_model=8"):
        m(torch.randn(2, 5, 7))
    with pytest.raises(AlignMambaError, match="mask"):
        m(torch.randn(2, 5, 8), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(AlignMambaError, match="state"):
        m(torch.randn(2, 5, 8), state=(torch.zeros(2, 16, 3), torch.zeros(2, 16, 5)))
    with pytest.raises(AlignMambaError, match="n_layers"):
        MambaStack(8, 0)


@pytest.mark.parametrize("bsz", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_project_t_is_linear_in_the_scan_layout(bsz, with_bias):
    """mamba._project_t equals F.linear(...).transpose(1, 2), values and gradients; for one
    sequence it is written contiguous (the scan then copies nothing)."""
    from alignmamba.ssm.mamba import _project_t

    g = torch.Generator().manual_seed(bsz)
    x0 = torch.randn(bsz, 11, 6, generator=g, dtype=torch.float64)
    w0 = torch.randn(5, 6, generator=g, dtype=torch.float64)
    b0 = torch.randn(5, generator=g, dtype=torch.float64) if with_bias else None
    gy = torch.randn(bsz, 5, 11, generator=g, dtype=torch.float64)
    outs = []
    for f in (lambda x, w, b: _project_t(x, w, b), lambda x, w, b: F.linear(x, w, b).transpose(1, 2)):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        b = b0.clone().requires_grad_() if with_bias else None
        y = f(x, w, b)
        y.backward(gy)
        outs.append((y, x.grad, w.grad, b.grad if with_bias else None))
    (y, *grads), (y_ref, *grads_ref) = outs
    assert y.shape == (bsz, 5, 11) and y.is_contiguous() == (bsz == 1)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, grads_ref):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
