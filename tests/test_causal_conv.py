"""The causal depthwise conv + SiLU of the Mamba layer (alignmamba/ssm/causal_conv.py): the
Triton inference kernel (ssm/conv_kernel.py) against the F.conv1d reference, and the dispatch.

Without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set before Triton is
imported); on a CUDA machine compiled, plus the Mamba layer with and without it.
"""
from __future__ import annotations

import pytest
import torch
from triton_kernels import CUDA, import_kernels

ck = import_kernels("alignmamba.ssm.conv_kernel", "_conv_silu_kernel")

from alignmamba.errors import AlignMambaError
from alignmamba.ssm import causal_conv as cc

DEV = "cuda" if CUDA else "cpu"
cc._kernel_fn[:] = [ck.conv1d_silu]  # the (possibly reloaded) kernel behind the dispatch


def _inputs(bsz=2, dim=20, length=150, k=4, dtype=torch.float32, seed=0, strided=False):
    """dim not a multiple of the 16-channel block, length not one of the 128-step block."""
    g = torch.Generator().manual_seed(seed)
    if strided:  # the layout F.linear(...).transpose(1, 2) gives: time is not the last stride
        x = torch.randn(bsz, length, dim, generator=g).to(DEV, dtype).transpose(1, 2)
    else:
        x = torch.randn(bsz, dim, length, generator=g).to(DEV, dtype)
    w = (torch.randn(dim, 1, k, generator=g) * 0.5).to(DEV)
    b = torch.randn(dim, generator=g).to(DEV)
    state = torch.randn(bsz, dim, k - 1, generator=g).to(DEV, dtype)
    return x, w, b, state


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_kernel_equals_reference_fp32(k, with_bias, with_state, strided):
    x, w, b, state = _inputs(k=k, strided=strided, seed=k)
    b = b if with_bias else None
    state = state if with_state else None
    got = cc.causal_conv1d_silu(x, w, b, state, kernel="triton")
    want = cc.causal_conv1d_silu_ref(x, w, b, state)
    assert got.shape == want.shape == x.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_short_sequence_reads_the_state_only():
    x, w, b, state = _inputs(length=2, k=4)  # fewer steps than taps
    got = cc.causal_conv1d_silu(x, w, b, state, kernel="triton")
    torch.testing.assert_close(got, cc.causal_conv1d_silu_ref(x, w, b, state), rtol=1e-5, atol=1e-6)


def test_kernel_bf16_error_at_most_twice_torch_bf16():
    """Against a float64 reference: the kernel (bf16 in and out, fp32 sums, fp32 weights) is
    held to 2x the error of the reference run in bf16 as autocast runs it (bf16 weights)."""
    x, w, b, state = _inputs(dim=32, length=300, dtype=torch.bfloat16, seed=5)
    exact = cc.causal_conv1d_silu_ref(x.double(), w.double(), b.double(), state.double())
    torch_bf16 = cc.causal_conv1d_silu_ref(x, w.bfloat16(), b.bfloat16(), state)
    got = cc.causal_conv1d_silu(x, w, b, state, kernel="triton")
    assert got.dtype == torch.bfloat16
    err_kernel = (got.double() - exact).abs().max().item()
    err_torch = (torch_bf16.double() - exact).abs().max().item()
    assert 0 < err_torch and err_kernel <= 2 * err_torch, (err_kernel, err_torch)


def test_auto_uses_the_reference_where_gradients_are_needed(monkeypatch):
    calls = []
    monkeypatch.setattr(cc, "_kernel_fn", [lambda *a: calls.append(1) or ck.conv1d_silu(*a)])
    x, w, b, state = _inputs()
    wg = w.clone().requires_grad_(True)
    y = cc.causal_conv1d_silu(x, wg, b, state)
    y.sum().backward()
    assert calls == [] and wg.grad is not None and wg.grad.abs().sum() > 0
    with torch.no_grad():
        cc.causal_conv1d_silu(x, wg, b, state)
    assert calls == ([1] if CUDA else [])  # auto takes the kernel on CUDA only


def test_kernel_choice_is_checked(monkeypatch):
    x, w, b, state = _inputs(length=8)
    with pytest.raises(AlignMambaError, match="kernel='fast' is not one of"):
        cc.causal_conv1d_silu(x, w, b, state, kernel="fast")
    with pytest.raises(AlignMambaError, match="has no backward"):
        cc.causal_conv1d_silu(x, w.clone().requires_grad_(True), b, state, kernel="triton")
    monkeypatch.setenv(cc.ENV_CONV_KERNEL, "cuda")
    with pytest.raises(AlignMambaError, match=f"{cc.ENV_CONV_KERNEL}='cuda'"):
        cc.causal_conv1d_silu(x, w, b, state)
    monkeypatch.setenv(cc.ENV_CONV_KERNEL, "torch")
    assert torch.equal(cc.causal_conv1d_silu(x, w, b, state), cc.causal_conv1d_silu_ref(x, w, b, state))


@pytest.mark.skipif(not CUDA, reason="the Mamba layer's inference path on a CUDA device")
def test_mamba_inference_with_the_kernel_equals_the_reference(monkeypatch):
    from alignmamba.ssm.mamba import Mamba

    torch.manual_seed(0)
    layer = Mamba(d_model=32, d_state=8).cuda().eval()
    x = torch.randn(1, 300, 32, device="cuda")
    with torch.no_grad():
        fused = layer(x)
        monkeypatch.setenv(cc.ENV_CONV_KERNEL, "torch")
        ref = layer(x)
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-5)
