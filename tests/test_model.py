"""AlignMamba model: shapes, gradients, ablation switches, padding, missing modalities, save/load."""
import dataclasses

import pytest
import torch

from alignmamba import AlignMamba, AlignMambaConfig, build_model
from alignmamba.errors import CheckpointError, ConfigError


def make_inputs(cfg: AlignMambaConfig, B: int = 3, lengths=None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T = {"text": 9, "audio": 23, "vision": 17, "extra": 11}
    feats, masks = {}, {}
    for i, m in enumerate(cfg.modalities):
        feats[m] = torch.randn(B, T[m], cfg.input_dims[m], generator=g)
        n = lengths[m] if lengths else [T[m] - (b * (i + 1)) % 5 for b in range(B)]
        masks[m] = torch.arange(T[m])[None] < torch.tensor(n)[:, None]
    return feats, masks


def small_cfg(**kw) -> AlignMambaConfig:
    base = {"d_model": 16, "n_layers": 2, "d_state": 4, "dropout": 0.0,
            "input_dims": {"text": 12, "audio": 5, "vision": 7}}
    base.update(kw)
    return AlignMambaConfig(**base)


SWITCHES = [
    {},
    {"use_ot": False},
    {"use_mmd": False},
    {"use_ot": False, "use_mmd": False},
    {"fusion": "concat"},
    {"ot_plan": "sinkhorn", "sinkhorn_iters": 10},
    {"ot_time_beta": 1.0},
    {"ot_normalize": "mean"},
    {"mmd_bandwidth": "median"},
    {"mmd_bandwidth": "multi"},
    {"encoder": "conv", "pooling": "max"},
    {"encoder": "linear", "pooling": "last", "modality_embedding": False},
]


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "paper")
@pytest.mark.parametrize("task", ["regression", "classification"])
def test_forward_backward_every_switch(switch, task):
    cfg = small_cfg(task=task, num_classes=3, **switch)
    torch.manual_seed(0)
    model = AlignMamba(cfg)
    feats, masks = make_inputs(cfg)
    out = model(feats, masks)
    assert out.pred.shape == ((3,) if task == "regression" else (3, 3))
    loss = out.pred.float().pow(2).mean() + out.align_loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # every unimodal encoder receives gradient (through eq. 6 or the resampling)
    for m in cfg.modalities:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders[m].parameters()), m
    if cfg.use_mmd:
        assert out.align_loss.item() > 0
    else:
        assert out.align_loss.item() == 0


def test_two_modalities_and_four_modalities():
    cfg2 = small_cfg(modalities=["text", "audio"], interleave_order=["audio", "text"],
                     input_dims={"text": 12, "audio": 5})
    m2 = AlignMamba(cfg2)
    f, k = make_inputs(cfg2)
    out = m2(f, k, return_plans=True)
    assert set(out.plans) == {"audio"} and out.plans["audio"].shape == (3, 23, 9)
    cfg4 = small_cfg(modalities=["text", "audio", "vision", "extra"],
                     interleave_order=["extra", "vision", "audio", "text"],
                     input_dims={"text": 12, "audio": 5, "vision": 7, "extra": 3}, anchor="audio")
    m4 = AlignMamba(cfg4)
    f, k = make_inputs(cfg4)
    out = m4(f, k, return_plans=True)
    assert set(out.plans) == {"text", "vision", "extra"}
    assert out.plans["vision"].shape == (3, 17, 23)
    out.pred.sum().backward()


def test_padding_does_not_change_outputs():
    cfg = small_cfg()
    torch.manual_seed(1)
    model = AlignMamba(cfg).eval()
    lengths = {"text": [6, 9, 4], "audio": [20, 23, 11], "vision": [10, 17, 5]}
    feats, masks = make_inputs(cfg, lengths=lengths)
    out1 = model(feats, masks, align_loss=True)
    assert out1.align_loss > 0
    # add more padding at the back filled with garbage
    feats2 = {m: torch.cat([x, 100 * torch.randn(x.shape[0], 5, x.shape[2])], 1) for m, x in feats.items()}
    masks2 = {m: torch.cat([k, torch.zeros(k.shape[0], 5, dtype=torch.bool)], 1) for m, k in masks.items()}
    # and garbage inside the existing padding
    for m, x in feats2.items():
        x[~masks2[m]] = 50.0
    out2 = model(feats2, masks2, align_loss=True)
    torch.testing.assert_close(out1.pred, out2.pred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out1.align_loss, out2.align_loss, rtol=1e-5, atol=1e-6)


def test_plans_returned_on_request_and_match_alignment():
    cfg = small_cfg()
    model = AlignMamba(cfg).eval()
    feats, masks = make_inputs(cfg)
    out = model(feats, masks, return_plans=True)
    assert out.plans is not None and set(out.plans) == {"audio", "vision"}
    for m, plan in out.plans.items():
        n = masks[m].sum(-1).float()
        torch.testing.assert_close(plan.sum((1, 2)), torch.ones(3))
        assert (plan > 0).sum((1, 2)).tolist() == n.long().tolist()
    assert model(feats, masks).plans is None


def test_missing_modalities_finite_loss_and_grads():
    cfg = small_cfg()
    model = AlignMamba(cfg)
    feats, masks = make_inputs(cfg, B=6)
    # rows: complete, no audio, no vision, no text (anchor), only text, only vision
    present = torch.tensor([[1, 1, 1], [1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 0], [0, 0, 1]], dtype=torch.bool)
    out = model(feats, masks, present=present)
    assert torch.isfinite(out.pred).all() and torch.isfinite(out.align_loss)
    (out.pred.sum() + out.align_loss).backward()
    for p in model.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()
    assert model.missing["audio"].grad.abs().sum() > 0
    assert model.missing["text"].grad.abs().sum() > 0
    # an absent modality's features do not matter
    feats2 = dict(feats)
    feats2["audio"] = feats["audio"].clone()
    feats2["audio"][1] = torch.randn_like(feats2["audio"][1]) * 10
    model.eval()
    a = model(feats, masks, present=present).pred
    b = model(feats2, masks, present=present).pred
    torch.testing.assert_close(a[1], b[1])


def test_save_load_round_trip(tmp_path):
    cfg = small_cfg(task="classification", num_classes=3)
    torch.manual_seed(3)
    model = AlignMamba(cfg).eval()
    feats, masks = make_inputs(cfg)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = AlignMamba.from_pretrained(tmp_path / "ckpt").eval()
    assert dataclasses.asdict(loaded.config) == dataclasses.asdict(cfg)
    assert torch.equal(model(feats, masks).pred, loaded(feats, masks).pred)


def test_checkpoint_validation(tmp_path):
    cfg = small_cfg()
    AlignMamba(cfg).save_pretrained(tmp_path / "c")
    import json
    p = tmp_path / "c" / "config.json"
    data = json.loads(p.read_text())
    data["model"]["d_model"] = 32
    p.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="shape"):
        AlignMamba.from_pretrained(tmp_path / "c")
    data["model"]["bogus"] = 1
    p.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="unknown key 'bogus'"):
        AlignMamba.from_pretrained(tmp_path / "c")
    with pytest.raises(CheckpointError, match="not found"):
        AlignMamba.from_pretrained(tmp_path / "nope")


def test_config_validation():
    with pytest.raises(ConfigError, match="anchor"):
        small_cfg(anchor="smell")
    with pytest.raises(ConfigError, match="interleave_order"):
        small_cfg(interleave_order=["text", "audio"])
    with pytest.raises(ConfigError, match="fusion"):
        small_cfg(fusion="sideways")
    with pytest.raises(ConfigError, match="unknown model"):
        build_model(small_cfg(model="nope"))


def test_align_loss_is_a_training_term():
    """L_align is computed in training mode (or on request) and skipped in eval mode by default;
    the prediction does not depend on it."""
    cfg = small_cfg()
    torch.manual_seed(2)
    model = AlignMamba(cfg)
    feats, masks = make_inputs(cfg)
    assert model(feats, masks).align_loss > 0  # training mode
    model.eval()
    skipped = model(feats, masks)
    asked = model(feats, masks, align_loss=True)
    assert skipped.align_loss == 0 and asked.align_loss > 0
    torch.testing.assert_close(skipped.pred, asked.pred, rtol=0, atol=0)
    assert model.train()(feats, masks, align_loss=False).align_loss == 0


def test_masked_pool_last_takes_the_last_valid_token_of_a_holed_mask():
    from alignmamba.model import masked_pool
    g = torch.Generator().manual_seed(3)
    B, T, d = 7, 10, 4
    x = torch.randn(B, T, d, generator=g) + 0.5
    mask = torch.rand(B, T, generator=g) < 0.5
    mask[0] = False  # no valid token -> zeros
    mask[1] = torch.tensor([1, 0, 0, 1, 0, 1, 0, 0, 0, 0], dtype=torch.bool)  # holes before the end
    mask[2, -1] = True  # last position valid
    want = torch.zeros(B, d)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        if idx:
            want[b] = x[b, idx[-1]]
    got = masked_pool(x, mask, "last")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got[0].abs().sum() == 0 and got[1].abs().sum() > 0
    # the old index (count - 1) would have picked another token for the holed row
    assert not torch.equal(x[1, int(mask[1].sum()) - 1], want[1])


def test_align_loss_on_complete_data_is_lambda_times_batch_mean_of_summed_mmd(mmd_calls):
    """Every modality present (no ``present`` and an all-True one): the per-source means over
    the defined samples reduce to the former lambda * mean_b sum_src MMD^2."""
    cfg = small_cfg(align_lambda=0.37)
    torch.manual_seed(5)
    model = AlignMamba(cfg).eval()
    feats, masks = make_inputs(cfg, B=4, seed=7)
    seen = mmd_calls
    with torch.no_grad():
        got = model(feats, masks, align_loss=True).align_loss
        assert len(seen) == 2 and all(s.shape == (4,) and (s > 0).all() for s in seen)
        old = cfg.align_lambda * torch.stack(seen, 0).sum(0).mean()
        torch.testing.assert_close(got, old)
        seen.clear()
        full = model(feats, masks, present=torch.ones(4, 3, dtype=torch.bool), align_loss=True).align_loss
    torch.testing.assert_close(full, got)
