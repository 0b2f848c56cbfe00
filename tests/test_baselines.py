"""Baselines (alignmamba/baselines.py): shapes, gradients, padding, missing modalities, checkpoints."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignmamba.baselines import Attention, sinusoidal_positions
from alignmamba.errors import ConfigError
from alignmamba.model import MODELS, AlignMambaConfig, build_model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest and immune to OpenMP stalls on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


BASELINES = ["transformer_single", "transformer_multi", "mamba_single", "mamba_multi"]
DIMS = {"text": 7, "audio": 3, "vision": 5}
LENS = {"text": 6, "audio": 9, "vision": 11}


def make_cfg(name: str, mods=("text", "audio", "vision"), task="regression", **kw) -> AlignMambaConfig:
    mods = list(mods)
    order = [m for m in ("vision", "audio", "text") if m in mods]
    args = {"d_model": 16, "n_layers": 2, "n_heads": 4, "d_state": 4, "num_classes": 3}
    args.update(kw)
    return AlignMambaConfig(model=name, modalities=mods, input_dims={m: DIMS[m] for m in mods},
                            interleave_order=order, task=task, **args)


def make_batch(mods, B=3, seed=0, lengths=None):
    """Random features with per-sample valid lengths (padding at the back, zeros there)."""
    g = torch.Generator().manual_seed(seed)
    feats, masks = {}, {}
    for i, m in enumerate(mods):
        T = LENS[m]
        lens = lengths[m] if lengths else [T - (b + i) % 4 for b in range(B)]
        mk = torch.arange(T)[None, :] < torch.tensor(lens)[:, None]
        feats[m] = torch.randn(B, T, DIMS[m], generator=g) * mk[..., None]
        masks[m] = mk
    return feats, masks


def test_registered():
    for name in BASELINES:
        assert name in MODELS or build_model(make_cfg(name)) is not None
        assert type(build_model(make_cfg(name))).model_name == name


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("task", ["regression", "classification"])
@pytest.mark.parametrize("mods", [("text", "audio", "vision"), ("text", "vision")])
def test_forward_backward(name, task, mods):
    torch.manual_seed(0)
    model = build_model(make_cfg(name, mods, task))
    feats, masks = make_batch(mods)
    out = model(feats, masks)
    assert out.pred.shape == ((3,) if task == "regression" else (3, 3))
    assert out.align_loss.shape == () and float(out.align_loss) == 0.0
    assert out.plans is None
    loss = out.pred.square().mean() if task == "regression" else F.cross_entropy(out.pred, torch.tensor([0, 1, 2]))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    # every modality's encoder must receive gradient (each modality reaches the prediction)
    for m in mods:
        g = grads[f"encoders.{m}.net.0.weight"]
        assert g is not None and g.abs().sum() > 0, m


@pytest.mark.parametrize("name", BASELINES)
def test_padding_invariance(name):
    """Extra padding at the back (with garbage values) changes nothing, and every sample of a
    padded batch gets the prediction it gets alone, unpadded."""
    torch.manual_seed(1)
    mods = ("text", "audio", "vision")
    model = build_model(make_cfg(name)).eval()
    feats, masks = make_batch(mods, B=3, seed=2)
    with torch.no_grad():
        ref = model(feats, masks).pred
        g = torch.Generator().manual_seed(3)
        pf = {m: torch.cat([x, torch.randn(x.shape[0], 4 + i, x.shape[2], generator=g) * 5], 1)
              for i, (m, x) in enumerate(feats.items())}
        pm = {m: torch.cat([mk, torch.zeros(mk.shape[0], 4 + i, dtype=torch.bool)], 1)
              for i, (m, mk) in enumerate(masks.items())}
        # garbage in the original padding too
        for m in mods:
            pf[m] = torch.where(pm[m][..., None], pf[m], torch.randn(pf[m].shape, generator=g))
        padded = model(pf, pm).pred
        torch.testing.assert_close(padded, ref, rtol=1e-4, atol=1e-5)
        for b in range(3):
            n = {m: int(masks[m][b].sum()) for m in mods}
            alone = model({m: feats[m][b:b + 1, :n[m]] for m in mods},
                          {m: masks[m][b:b + 1, :n[m]] for m in mods}).pred
            torch.testing.assert_close(alone, ref[b:b + 1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", BASELINES)
def test_missing_modalities(name):
    torch.manual_seed(2)
    mods = ("text", "audio", "vision")
    model = build_model(make_cfg(name)).eval()
    feats, masks = make_batch(mods, B=4, seed=4)
    present = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    out = model(feats, masks, present=present)
    assert torch.isfinite(out.pred).all()
    # an absent modality's features must not matter
    changed = {m: x.clone() for m, x in feats.items()}
    changed["audio"][1] = torch.randn_like(changed["audio"][1]) * 3
    changed["text"][2:] = torch.randn_like(changed["text"][2:]) * 3
    changed["vision"][3] = torch.randn_like(changed["vision"][3]) * 3
    with torch.no_grad():
        torch.testing.assert_close(model(changed, masks, present=present).pred, out.pred.detach())
        # present ones do matter (the test above could pass with a model that ignores inputs)
        changed["audio"][0] = torch.randn_like(changed["audio"][0]) * 3
        assert not torch.allclose(model(changed, masks, present=present).pred[0], out.pred[0])
    # gradients through a batch with absent modalities stay finite
    model.train()
    out = model(feats, masks, present=present)
    out.pred.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", BASELINES)
def test_save_load_roundtrip(name, tmp_path):
    torch.manual_seed(3)
    model = build_model(make_cfg(name, task="classification")).eval()
    feats, masks = make_batch(("text", "audio", "vision"))
    model.save_pretrained(tmp_path / "ck")
    loaded = type(model).from_pretrained(tmp_path / "ck").eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(feats, masks).pred, model(feats, masks).pred, rtol=0, atol=0)


def reference_attention(att: Attention, x, ctx, key_mask):
    """Plain softmax(Q K^T / sqrt(dh)) V with masked keys (the readable reference)."""
    B, Tq, d = x.shape
    h = att.h
    q = att.q(x).view(B, Tq, h, d // h).transpose(1, 2)
    k, v = att.kv(ctx).view(B, ctx.shape[1], 2, h, d // h).unbind(2)
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    s = q @ k.transpose(-1, -2) / math.sqrt(d // h)
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], -math.inf)
    y = torch.softmax(s, -1) @ v
    return att.out(y.transpose(1, 2).reshape(B, Tq, d))


@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_reference(masked):
    torch.manual_seed(4)
    att = Attention(16, 4, dropout=0.0).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    km = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool) if masked else None
    fast = att(x, ctx, None if km is None else km[:, None, None, :])
    ref = reference_attention(att, x, ctx, km)
    torch.testing.assert_close(fast, ref)
    w = torch.randn_like(fast)
    gf = torch.autograd.grad((fast * w).sum(), [x, ctx] + list(att.parameters()))
    gr = torch.autograd.grad((ref * w).sum(), [x, ctx] + list(att.parameters()))
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b)


def test_sinusoidal_positions():
    p = sinusoidal_positions(5, 6)
    assert p.shape == (5, 6)
    # position t, pair i: sin(t w_i), cos(t w_i), w_i = 10000^(-i/3)
    for t in range(5):
        for i in range(3):
            w = 10000.0 ** (-i / 3)
            assert math.isclose(float(p[t, 2 * i]), math.sin(t * w), abs_tol=1e-6)
            assert math.isclose(float(p[t, 2 * i + 1]), math.cos(t * w), abs_tol=1e-6)
    assert sinusoidal_positions(3, 5).shape == (3, 5)


def test_heads_must_divide_width():
    with pytest.raises(ConfigError, match="n_heads"):
        build_model(make_cfg("transformer_single", n_heads=3))


@pytest.mark.parametrize("name", BASELINES)
def test_no_masks_equals_all_valid_masks(name):
    """masks=None (no padding, known statically: no host sync) gives the all-True-masks result."""
    torch.manual_seed(0)
    model = build_model(make_cfg(name)).eval()
    feats, _ = make_batch(("text", "audio", "vision"))
    full = {m: torch.ones(x.shape[:2], dtype=torch.bool) for m, x in feats.items()}
    torch.testing.assert_close(model(feats, None).pred, model(feats, full).pred, rtol=1e-5, atol=1e-6)
