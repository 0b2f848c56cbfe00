"""The fused relaxed-OT argmax (alignmamba.ot_kernel) against the torch tiling and the dense plan.

Without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set before Triton is
imported); on a CUDA machine compiled, plus a bf16 case under autocast.
"""
from __future__ import annotations

import pytest
import torch
from triton_kernels import CUDA, import_kernels

otk = import_kernels("alignmamba.ot_kernel", "_ot_argmax_kernel")

from alignmamba import alignment as al
from alignmamba.errors import AlignMambaError

DEV = "cuda" if CUDA else "cpu"
al._ot_argmax_fn[:] = [otk.ot_argmax]  # the (possibly reloaded) kernel behind relaxed_ot_assign


def _masks(lengths, T):
    return torch.arange(T, device=DEV)[None, :] < torch.tensor(lengths, device=DEV)[:, None]


def _pair(ts_len, ta_len, dim, seed):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(3, ts_len, dim, generator=g).to(DEV)
    anc = torch.randn(3, ta_len, dim, generator=g).to(DEV)
    sm = _masks([ts_len, ts_len // 2, 1], ts_len)
    am = _masks([ta_len, ta_len - 7, 3], ta_len)
    return src, anc, sm, am


@pytest.mark.parametrize("ts_len,ta_len,dim", [(70, 45, 20), (33, 150, 80)])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_fused_argmax_equals_tiling_and_dense(ts_len, ta_len, dim, beta):
    """Lengths not a multiple of the blocks, d below one K block and over it, several anchor
    blocks, padded source rows and anchor columns, the order-aware cost."""
    src, anc, sm, am = _pair(ts_len, ta_len, dim, seed=ts_len + dim)
    idx_f, w_f = al.relaxed_ot_assign(src, anc, sm, am, beta, kernel="triton")
    idx_t, w_t = al.relaxed_ot_assign(src, anc, sm, am, beta, tile=16, kernel="torch")
    assert torch.equal(idx_f, idx_t) and torch.equal(w_f, w_t)
    dense = al.relaxed_ot_plan(src, anc, sm, am, beta)
    assert torch.equal(al.plan_from_assignment(idx_f, w_f, ta_len), dense)


@pytest.mark.parametrize("dim,config", [
    (40, (16, 16, 16, 4, 1)),  # d over three K blocks, the last one partial
    (40, (32, 16, 64, 4, 2)),  # source rows resident, K padded past d
    (32, (16, 32, 32, 4, 1)),  # source rows resident, K = d
])
def test_fused_argmax_block_configs_equal_tiling(monkeypatch, dim, config):
    """Every block shape computes the same argmax: pick_config only changes the speed."""
    src, anc, sm, am = _pair(37, 70, dim, seed=dim)
    idx_t, w_t = al.relaxed_ot_assign(src, anc, sm, am, 0.5, tile=16, kernel="torch")
    monkeypatch.setattr(otk, "pick_config", lambda *a: config)
    idx_f, w_f = al.relaxed_ot_assign(src, anc, sm, am, 0.5, kernel="triton")
    assert torch.equal(idx_f, idx_t) and torch.equal(w_f, w_t)


def test_fused_argmax_refuses_bad_block_config():
    src, anc, _, am = _pair(8, 8, 16, seed=0)
    with pytest.raises(ValueError, match="BN=24 must be a power of 2"):
        otk.ot_argmax(src, anc, am, config=(16, 24, 16, 4, 1))


def test_fused_ties_go_to_lowest_index_within_and_across_blocks():
    g = torch.Generator().manual_seed(3)
    anc = torch.randn(1, 150, 16, generator=g)
    d1, d2 = torch.randn(16, generator=g), torch.randn(16, generator=g)
    for j, scale in ((70, 1.0), (5, 2.0), (140, 0.5)):  # one direction in blocks 1, 0, 2
        anc[0, j] = d1 * scale
    for j, scale in ((100, 1.0), (80, 4.0)):  # another, twice in block 1 (powers of 2: exact ties)
        anc[0, j] = d2 * scale
    src = torch.stack([d1 * 4.0, d2 * 0.1])[None]
    idx, _ = al.relaxed_ot_assign(src.to(DEV), anc.to(DEV), kernel="triton")
    assert idx[0].tolist() == [5, 80]


def test_fused_sample_without_anchor_gets_nothing():
    src, anc, sm, am = _pair(20, 30, 8, seed=1)
    am[1] = False
    idx, w = al.relaxed_ot_assign(src, anc, sm, am, kernel="triton")
    assert idx[1].eq(0).all() and w[1].eq(0).all() and w[0].gt(0).any()
    out = al.relaxed_ot_align(src, anc, sm, am, kernel="triton")
    assert out[1].abs().sum() == 0


@pytest.mark.parametrize("normalize", ["mass", "mean"])
def test_align_with_fused_argmax_equals_torch_with_gradients(normalize):
    """Same assignment, hence the same aligned output and gradient; on CUDA the scatter-add
    sums with atomics in no fixed order, so outputs agree to fp32 rounding, not bit for bit."""
    src, anc, sm, am = _pair(40, 25, 12, seed=7)
    idx_f, _ = al.relaxed_ot_assign(src, anc, sm, am, 0.2, kernel="triton")
    idx_t, _ = al.relaxed_ot_assign(src, anc, sm, am, 0.2, kernel="torch")
    assert torch.equal(idx_f, idx_t)
    outs, grads = [], []
    for kernel in ("triton", "torch"):
        x = src.clone().requires_grad_(True)
        out = al.relaxed_ot_align(x, anc, sm, am, 0.2, normalize, kernel=kernel)
        (out * torch.linspace(-1, 1, out.numel(), device=DEV).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append(x.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)
    assert grads[0].abs().sum() > 0


@pytest.mark.skipif(not CUDA, reason="auto's choice on a CUDA device")
def test_auto_fuses_half_precision_products_only(monkeypatch):
    """auto: the fused kernel when the products run in bf16 (autocast), the torch tiling in
    fp32 (cuBLAS's fp32 matmul beats the kernel's exact fp32 products)."""
    src, anc, sm, am = _pair(30, 20, 16, seed=4)
    calls = []
    real = al._load_ot_argmax()
    monkeypatch.setattr(al, "_ot_argmax_fn", [lambda *a: calls.append(a[0].dtype) or real(*a)])
    al.relaxed_ot_assign(src, anc, sm, am)
    assert calls == []
    with torch.autocast("cuda", dtype=torch.bfloat16):
        al.relaxed_ot_assign(src, anc, sm, am)
    assert calls == [torch.bfloat16]


def test_kernel_choice_is_checked(monkeypatch):
    src, anc, sm, am = _pair(8, 6, 4, seed=2)
    with pytest.raises(AlignMambaError, match="kernel='fast' is not one of"):
        al.relaxed_ot_assign(src, anc, sm, am, kernel="fast")
    monkeypatch.setenv(al.ENV_OT_KERNEL, "cuda")
    with pytest.raises(AlignMambaError, match=f"{al.ENV_OT_KERNEL}='cuda'"):
        al.relaxed_ot_assign(src, anc, sm, am)
    monkeypatch.setenv(al.ENV_OT_KERNEL, "torch")
    calls = []
    monkeypatch.setattr(al, "_ot_argmax_fn", [lambda *a: calls.append(a)])
    al.relaxed_ot_assign(src, anc, sm, am)  # the environment's "torch" replaces auto
    al.relaxed_ot_assign(src, anc, sm, am, kernel="torch")
    assert calls == []
    monkeypatch.delenv(al.ENV_OT_KERNEL)
    if not CUDA:  # auto stays on the torch tiling off CUDA, even with Triton importable
        al.relaxed_ot_assign(src, anc, sm, am)
        assert calls == []


@pytest.mark.skipif(not CUDA, reason="bf16 tensor-core products need a CUDA device")
def test_fused_argmax_bf16_under_autocast():
    """Under autocast the products are bf16 with fp32 sums; each source token is a noisy copy
    of one anchor token, so the right answer is clear and both paths must find it."""
    g = torch.Generator().manual_seed(5)
    anc = torch.randn(2, 300, 64, generator=g).to(DEV)
    perm = torch.stack([torch.randperm(300, generator=g)[:257] for _ in range(2)]).to(DEV)
    src = torch.gather(anc, 1, perm[..., None].expand(-1, -1, 64))
    src = src + 0.01 * torch.randn(src.shape, generator=g).to(DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        idx_f, _ = al.relaxed_ot_assign(src, anc, kernel="triton")
        idx_t, _ = al.relaxed_ot_assign(src, anc, kernel="torch")
    assert torch.equal(idx_f, perm) and torch.equal(idx_t, perm)
