"""Relaxed OT (eq. 3-6), Sinkhorn, resampling and MMD (eq. 7-9) against direct computations."""
import math

import pytest
import torch

from alignmamba import alignment as al


def _masks(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(3, 11, 8, generator=g)
    anc = torch.randn(3, 7, 8, generator=g)
    sm = _masks([11, 6, 1], 11)
    am = _masks([7, 4, 2], 7)
    return src, anc, sm, am


def test_plan_row_sums_argmin_and_masks(pair):
    src, anc, sm, am = pair
    plan = al.relaxed_ot_plan(src, anc, sm, am)
    assert plan.shape == (3, 11, 7)
    cost = 1 - torch.nn.functional.cosine_similarity(src[:, :, None], anc[:, None], dim=-1)
    for b in range(3):
        n = int(sm[b].sum())
        na = int(am[b].sum())
        for i in range(11):
            row = plan[b, i]
            if i < n:
                j = int(cost[b, i, :na].argmin())
                assert row[j].item() == pytest.approx(1.0 / n)
                assert row.sum().item() == pytest.approx(1.0 / n)
            else:
                assert row.abs().sum() == 0
        assert plan[b, :, na:].abs().sum() == 0  # padded anchor columns receive nothing
        assert plan[b].sum().item() == pytest.approx(1.0)


def test_plan_ties_go_to_lowest_index():
    anc = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0]]])  # columns 0, 2, 3 identical direction
    src = torch.tensor([[[3.0, 0.0], [0.0, 5.0]]])
    plan = al.relaxed_ot_plan(src, anc)
    assert plan[0, 0].nonzero().flatten().tolist() == [0]
    assert plan[0, 1].nonzero().flatten().tolist() == [1]
    idx, _w = al.relaxed_ot_assign(src, anc, tile=1)  # ties across tiles too
    assert idx[0].tolist() == [0, 1]


def test_tiled_assignment_equals_dense(pair):
    src, anc, sm, am = pair
    dense = al.relaxed_ot_plan(src, anc, sm, am)
    for tile in (1, 3, 4, 1024):
        idx, w = al.relaxed_ot_assign(src, anc, sm, am, tile=tile)
        assert torch.equal(al.plan_from_assignment(idx, w, anc.shape[1]), dense)
    for beta in (0.5, 3.0):
        dense_b = al.relaxed_ot_plan(src, anc, sm, am, time_beta=beta)
        idx, w = al.relaxed_ot_assign(src, anc, sm, am, time_beta=beta, tile=3)
        assert torch.equal(al.plan_from_assignment(idx, w, anc.shape[1]), dense_b)


def test_order_aware_cost_changes_plan():
    g = torch.Generator().manual_seed(1)
    src = torch.randn(1, 40, 4, generator=g)
    anc = torch.randn(1, 10, 4, generator=g)
    p0 = al.relaxed_ot_plan(src, anc)
    p_big = al.relaxed_ot_plan(src, anc, time_beta=100.0)
    # with a huge beta the plan is monotone in time: source token i -> anchor floor(i / 4)
    cols = p_big[0].argmax(-1)
    assert cols.tolist() == [i // 4 for i in range(40)]
    assert not torch.equal(p0, p_big)


def test_align_equals_plan_transpose_src_and_gradients(pair):
    src, anc, sm, am = pair
    src = src.double().requires_grad_(True)
    anc = anc.double().requires_grad_(True)
    out = al.relaxed_ot_align(src, anc, sm, am, tile=2)
    plan = al.relaxed_ot_plan(src, anc, sm, am).to(src.dtype)
    ref = plan.transpose(1, 2) @ src
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    # d/dsrc of sum(w * plan^T src) = plan @ w; the anchor (only used in the argmin) gets none
    torch.testing.assert_close(src.grad, plan @ w, rtol=1e-12, atol=1e-12)
    assert anc.grad is None or anc.grad.abs().sum() == 0
    assert al.relaxed_ot_plan(src, anc, sm, am).requires_grad is False


@pytest.mark.parametrize("feat", [(), (5,)], ids=["counts", "rows"])
def test_deterministic_add_at_equals_scatter_add_with_gradients(feat):
    """The index-add path (used on CUDA under torch.use_deterministic_algorithms) adds the same
    values at the same places as the scatter-add, many sources landing on one row included."""
    g = torch.Generator().manual_seed(3)
    index = torch.randint(0, 4, (3, 11), generator=g)  # 11 sources onto 4 rows: collisions
    index[1] = 2  # a sample whose sources all land on one row
    vals = torch.randn(3, 11, *feat, generator=g, dtype=torch.float64).requires_grad_(True)
    base = torch.randn(3, 4, *feat, generator=g, dtype=torch.float64)
    outs, grads = [], []
    for det in (False, True):
        out = al._add_at(base, index, vals, deterministic=det)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
        (gv,) = torch.autograd.grad((out * w).sum(), vals)
        outs.append(out.detach())
        grads.append(gv)
    ref = base.clone()
    for b in range(3):
        for i in range(11):
            ref[b, index[b, i]] += vals[b, i].detach()
    torch.testing.assert_close(outs[0], ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outs[1], ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)  # a gather either way
    assert al._add_at(base, index, vals).shape == base.shape  # auto: scatter-add off CUDA


def test_align_mean_normalisation(pair):
    src, anc, sm, am = pair
    plan = al.relaxed_ot_plan(src, anc, sm, am)
    counts = (plan > 0).sum(1)  # (B, Ta) tokens matched per anchor row
    out = al.relaxed_ot_align(src, anc, sm, am, normalize="mean")
    ref = ((plan > 0).to(src.dtype).transpose(1, 2) @ src) / counts.clamp(min=1)[..., None]
    torch.testing.assert_close(out, ref)


def test_missing_anchor_gives_zero_plan():
    src = torch.randn(2, 5, 3)
    anc = torch.randn(2, 4, 3)
    am = torch.tensor([[True] * 4, [False] * 4])
    plan = al.relaxed_ot_plan(src, anc, None, am)
    assert plan[1].abs().sum() == 0 and plan[0].sum().item() == pytest.approx(1.0)
    out = al.relaxed_ot_align(src, anc, None, am)
    assert out[1].abs().sum() == 0


def test_sinkhorn_marginals_and_gradient(pair):
    src, anc, sm, am = pair
    src = src.clone().requires_grad_(True)
    anc = anc.clone().requires_grad_(True)
    plan = al.sinkhorn_plan(src, anc, sm, am, eps=0.1, n_iters=200)
    for b in range(3):
        n, na = int(sm[b].sum()), int(am[b].sum())
        torch.testing.assert_close(plan[b, :n].sum(-1), torch.full((n,), 1.0 / n), rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(plan[b].sum(0)[:na], torch.full((na,), 1.0 / na), rtol=1e-3, atol=1e-5)
        assert plan[b, n:].abs().sum() == 0 and plan[b, :, na:].abs().sum() == 0
    (plan * torch.randn_like(plan)).sum().backward()
    assert torch.isfinite(src.grad).all() and src.grad.abs().sum() > 0
    assert torch.isfinite(anc.grad).all() and anc.grad.abs().sum() > 0


def test_resample_matches_adaptive_avg_pool():
    g = torch.Generator().manual_seed(2)
    src = torch.randn(2, 13, 4, generator=g)
    sm = _masks([13, 9], 13)
    tm = _masks([5, 3], 6)
    out = al.resample_to(src, sm, 6, tm)
    for b, (ns, nt) in enumerate([(13, 5), (9, 3)]):
        ref = torch.nn.functional.adaptive_avg_pool1d(src[b, :ns].T[None], nt)[0].T
        torch.testing.assert_close(out[b, :nt], ref)
        assert out[b, nt:].abs().sum() == 0


def _mmd_direct(x, y, sigma):
    """eq. 8 written out with loops, float64."""
    def k(a, b):
        return math.exp(-float(((a - b) ** 2).sum()) / (2 * sigma**2))
    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n)) / n**2
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m)) / m**2
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return kxx + kyy - 2 * kxy


def test_mmd_equals_direct_float64_with_masks():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    y = torch.randn(2, 5, 3, generator=g, dtype=torch.float64) + 0.5
    xm, ym = _masks([6, 4], 6), _masks([5, 2], 5)
    for sigma in (0.7, 1.0, 2.5):
        expect = [_mmd_direct(x[0, :6], y[0, :5], sigma), _mmd_direct(x[1, :4], y[1, :2], sigma)]
        for fn in (al.mmd2_dense, lambda *a, **k: al.mmd2(*a, tile=2, **k)):
            got = fn(x, y, sigma, xm, ym)
            assert got.tolist() == pytest.approx(expect, rel=1e-5, abs=1e-6)


def test_mmd_zero_for_identical_and_empty_sets():
    x = torch.randn(2, 7, 4)
    assert al.mmd2(x, x).abs().max() < 1e-6
    assert al.mmd2_dense(x, x, bandwidth="multi").abs().max() < 1e-6
    ym = torch.tensor([[True] * 7, [False] * 7])
    out = al.mmd2(x, x + 1, y_mask=ym)
    assert out[1] == 0 and out[0] > 0


@pytest.mark.parametrize("bandwidth", ["fixed", "median", "multi"])
def test_tiled_mmd_equals_dense_with_gradients(bandwidth):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = (torch.randn(2, 7, 5, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
    xm, ym = _masks([9, 5], 9), _masks([7, 3], 7)
    d = al.mmd2_dense(x, y, 1.3, xm, ym, bandwidth)
    t = al.mmd2(x, y, 1.3, xm, ym, bandwidth, tile=4)
    torch.testing.assert_close(t, d, rtol=1e-10, atol=1e-12)
    gd = torch.autograd.grad(d.sum(), (x, y))
    gt = torch.autograd.grad(t.sum(), (x, y))
    for a, b in zip(gt, gd):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        assert b.abs().sum() > 0


def test_nanmedian_rows_equals_torch_nanmedian():
    """The sort-based median (deterministic on CUDA) picks nanmedian's element: odd and even
    counts, NaN holes, a row of NaN only, ties."""
    g = torch.Generator().manual_seed(4)
    v = torch.randn(6, 9, generator=g)
    v[1, ::2] = math.nan  # 4 values left: the lower median
    v[2, 3] = math.nan    # 8 left
    v[3] = math.nan       # none
    v[4] = torch.tensor([2.0, 1.0, 2.0, 2.0, 3.0, 1.0, math.nan, 2.0, 0.5])  # ties
    got = al._nanmedian_rows(v)
    ref = torch.nanmedian(v, dim=1).values
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.isnan(got[3])
    keep = ~torch.isnan(ref)
    assert torch.equal(got[keep], ref[keep])


def test_median_bandwidth_is_scale_free():
    x = torch.randn(1, 20, 3)
    y = torch.randn(1, 20, 3) + 1.0
    a = al.mmd2(x, y, bandwidth="median")
    b = al.mmd2(10 * x, 10 * y, bandwidth="median")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("budget", [1, 7, 40, 1 << 24])
def test_budget_tiles_equal_dense(pair, monkeypatch, budget):
    """tile=None sizes blocks from TILE_BUDGET; any budget gives the dense plan, output and MMD."""
    monkeypatch.setattr(al, "TILE_BUDGET", budget)
    src, anc, sm, am = pair
    ti, tj = al._tiles(src.shape[0], src.shape[1], anc.shape[1], None)
    assert src.shape[0] * ti * tj <= max(budget, src.shape[0])  # one block never exceeds the budget
    for beta in (0.0, 0.5):
        idx, w = al.relaxed_ot_assign(src, anc, sm, am, time_beta=beta, tile=None)
        dense = al.relaxed_ot_plan(src, anc, sm, am, time_beta=beta)
        assert torch.equal(al.plan_from_assignment(idx, w, anc.shape[1]), dense)
    x = src.double().requires_grad_(True)
    y = anc.double().requires_grad_(True)
    d = al.mmd2_dense(x, y, 1.3, sm, am)
    t = al.mmd2(x, y, 1.3, sm, am, tile=None)
    torch.testing.assert_close(t, d, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(t.sum(), (x, y)), torch.autograd.grad(d.sum(), (x, y))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
