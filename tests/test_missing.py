"""Missing modalities (alignmamba/missing.py): IMDer and token protocols, training sampler,
finite loss/gradients with absent modalities, evaluation over rates, JSON/PNG, CLI."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from alignmamba import AlignMamba, AlignMambaConfig, build_model
from alignmamba.errors import ConfigError
from alignmamba.missing import (
    IMDER_TABLE,
    TrainingMissingSampler,
    apply_missing,
    evaluate_over_rates,
    evaluation_masks,
    imder_shares,
    parse_rates,
    sample_modality_mask,
    sample_token_mask,
    summarize_rates,
)

MODS = ("text", "audio", "vision")


def _z(p: float, n: int) -> float:
    """Allowed deviation of an empirical share: 5 binomial standard errors (+ tiny slack)."""
    return 5.0 * math.sqrt(max(p * (1 - p), 0.0) / n) + 1e-12


# ------------------------------------------------------------------ IMDer protocol


def test_imder_shares_table_and_interpolation():
    for r, (two, one) in IMDER_TABLE.items():
        assert imder_shares(r) == pytest.approx((two, one))
    assert imder_shares(0.0) == (0.0, 0.0)
    assert imder_shares(0.05) == pytest.approx((0.05, 0.05))  # between complete and 0.1
    assert imder_shares(0.35) == pytest.approx((0.4, 0.25))  # halfway between 0.3 and 0.4
    assert imder_shares(0.65) == pytest.approx((0.95, 0.0))
    assert imder_shares(0.9) == pytest.approx((1.0, 0.0))  # saturated above 0.7
    for bad in (-0.1, 1.5, float("nan"), "x"):
        with pytest.raises(ConfigError):
            imder_shares(bad)


@pytest.mark.parametrize("rate", sorted(IMDER_TABLE) + [0.25, 0.45])
def test_imder_shares_within_sampling_error(rate):
    n = 20000
    present = sample_modality_mask(n, rate, MODS, seed=3)
    assert present.shape == (n, 3) and present.dtype == bool
    n_missing = 3 - present.sum(1)
    p_two, p_one = imder_shares(rate)
    assert abs(np.mean(n_missing == 2) - p_two) <= _z(p_two, n)
    assert abs(np.mean(n_missing == 1) - p_one) <= _z(p_one, n)
    assert (n_missing <= 2).all()  # at least one present, always
    # which modality remains / goes is uniform
    two = n_missing == 2
    if two.sum() > 1000:
        share = present[two].mean(0)
        assert np.all(np.abs(share - 1 / 3) <= _z(1 / 3, int(two.sum())))
    one = n_missing == 1
    if one.sum() > 1000:
        share = (~present[one]).mean(0)
        assert np.all(np.abs(share - 1 / 3) <= _z(1 / 3, int(one.sum())))


def test_imder_deterministic_prefix_stable_and_nested():
    a = sample_modality_mask(500, 0.3, MODS, seed=7)
    np.testing.assert_array_equal(a, sample_modality_mask(500, 0.3, MODS, seed=7))
    assert not np.array_equal(a, sample_modality_mask(500, 0.3, MODS, seed=8))
    # row i depends on (seed, i, rate) only: a split's masks can be indexed per sample
    np.testing.assert_array_equal(a[:123], sample_modality_mask(123, 0.3, MODS, seed=7))
    # common random numbers: a sample never loses fewer modalities at a higher rate
    prev = np.zeros(500, dtype=int)
    for r in np.linspace(0, 1, 21):
        miss = 3 - sample_modality_mask(500, float(r), MODS, seed=7).sum(1)
        assert (miss >= prev).all()
        prev = miss
    assert (sample_modality_mask(100, 0.0, MODS) == 1).all()


@pytest.mark.parametrize("m", [1, 2, 4, 5])
def test_imder_other_numbers_of_modalities(m):
    mods = [f"m{i}" for i in range(m)]
    n = 20000
    for r in (0.1, 0.4, 0.7, 1.0):
        present = sample_modality_mask(n, r, mods, seed=1)
        assert present.shape == (n, m) and (present.sum(1) >= 1).all()
        if m == 1:
            assert present.all()
            continue
        p_two, p_one = imder_shares(r)
        n_missing = m - present.sum(1)
        if m == 2:  # both cases drop exactly one
            assert abs(np.mean(n_missing == 1) - (p_two + p_one)) <= _z(p_two + p_one, n)
        else:  # "two of three missing" -> only one remains; "one missing" -> exactly one lost
            assert abs(np.mean(n_missing == m - 1) - p_two) <= _z(p_two, n)
            assert abs(np.mean(n_missing == 1) - p_one) <= _z(p_one, n)
            assert set(np.unique(n_missing)) <= {0, 1, m - 1}


def test_imder_rejects_bad_arguments():
    with pytest.raises(ConfigError):
        sample_modality_mask(-1, 0.1)
    with pytest.raises(ConfigError):
        sample_modality_mask(10, 0.1, ("a", "a"))
    with pytest.raises(ConfigError):
        sample_modality_mask(10, 1.2)


# ------------------------------------------------------------------ token protocol


def _random_real(n: int, t: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, size=n)
    lengths[:5] = 1  # single-token rows must keep their token
    return np.arange(t)[None, :] < lengths[:, None]


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_token_protocol_fraction_and_at_least_one(rate):
    real = _random_real(4000, 60, seed=0)
    kept = sample_token_mask(real, rate, seed=5)
    assert kept.shape == real.shape and not (kept & ~real).any()
    assert (kept.sum(1) >= 1).all()
    length = real.sum(1)
    dropped = length - kept.sum(1)
    # stochastic rounding: E[dropped] = rate * L except where the cap L - 1 binds
    cap = np.maximum(length - 1, 0)
    free = rate * length <= cap - 1  # rows where the cap can never bind
    frac = dropped[free].sum() / length[free].sum()
    assert abs(frac - rate) < 0.01
    # per row: floor or ceil of rate * L, never more than L - 1
    assert (dropped >= np.minimum(np.floor(rate * length), cap)).all()
    assert (dropped <= np.minimum(np.ceil(rate * length), cap)).all()


def test_token_protocol_deterministic_nested_and_rate_zero():
    real = _random_real(300, 40, seed=1)
    a = sample_token_mask(real, 0.4, seed=2, stream=1)
    np.testing.assert_array_equal(a, sample_token_mask(real, 0.4, seed=2, stream=1))
    assert not np.array_equal(a, sample_token_mask(real, 0.4, seed=3, stream=1))
    assert not np.array_equal(a, sample_token_mask(real, 0.4, seed=2, stream=2))
    np.testing.assert_array_equal(a[:50], sample_token_mask(real[:50], 0.4, seed=2, stream=1))
    np.testing.assert_array_equal(sample_token_mask(real, 0.0, seed=2), real)
    prev = real
    for r in np.linspace(0, 1, 11):
        k = sample_token_mask(real, float(r), seed=2, stream=1)
        assert not (k & ~prev).any()  # kept tokens at a higher rate are a subset
        prev = k
    # works for masks with holes as well (only real tokens count)
    holes = real & (np.arange(40)[None, :] % 3 != 1)
    kh = sample_token_mask(holes, 0.5, seed=0)
    assert not (kh & ~holes).any() and (kh.sum(1) >= np.minimum(holes.sum(1), 1)).all()


# ---------------------------------------------------------- masks on batches, training sampler


def _batch(b: int = 6, seed: int = 0, dims=(12, 5, 7)) -> dict:
    g = torch.Generator().manual_seed(seed)
    T = {"text": 9, "audio": 23, "vision": 17}
    feats, masks = {}, {}
    for i, (m, d) in enumerate(zip(MODS, dims)):
        feats[m] = torch.randn(b, T[m], d, generator=g)
        lengths = torch.tensor([T[m] - (j * (i + 2)) % 6 for j in range(b)])
        masks[m] = torch.arange(T[m])[None] < lengths[:, None]
        feats[m] = feats[m] * masks[m][..., None]
    return {
        "features": feats,
        "masks": masks,
        "label": torch.randn(b, generator=g) * 1.5,
        "index": torch.arange(b),
    }


def test_apply_missing_copies_and_zeroes():
    batch = _batch()
    orig = {m: x.clone() for m, x in batch["features"].items()}
    present = torch.tensor(
        [[1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 1, 1], [0, 0, 1], [1, 0, 0]], dtype=torch.bool
    )
    out = apply_missing(batch, MODS, present=present)
    for m in MODS:
        torch.testing.assert_close(batch["features"][m], orig[m])  # input untouched
        torch.testing.assert_close(out["masks"][m], batch["masks"][m])  # masks kept (anchor grid)
    for i, m in enumerate(MODS):
        assert (out["features"][m][~present[:, i]] == 0).all()
        torch.testing.assert_close(out["features"][m][present[:, i]], orig[m][present[:, i]])
    # an existing "present" is combined, not replaced
    again = apply_missing(out, MODS, present=torch.ones(6, 3, dtype=torch.bool))
    assert torch.equal(again["present"], present)


def test_training_sampler_imder():
    batch = _batch(b=64)
    s = TrainingMissingSampler("imder", 0.7, list(MODS), seed=1)
    out = s(batch)
    p = out["present"]
    assert p.shape == (64, 3) and p.dtype == torch.bool
    assert (p.sum(1) == 1).all()  # rate 0.7: every sample keeps one modality
    for i, m in enumerate(MODS):
        assert (out["features"][m][~p[:, i]] == 0).all()
    # reproducible for a seed, and a new draw each batch
    s2 = TrainingMissingSampler("imder", 0.7, list(MODS), seed=1)
    assert torch.equal(s2(batch)["present"], p)
    assert not torch.equal(s2(batch)["present"], p)
    # rate < 0: uniform in [0.1, 0.7] per batch
    rnd = TrainingMissingSampler("imder", -1, list(MODS), seed=0)
    rates = [rnd.draw_rate() for _ in range(200)]
    assert min(rates) >= 0.1 and max(rates) <= 0.7 and np.std(rates) > 0.1
    assert TrainingMissingSampler("imder", 0.3, list(MODS)).draw_rate() == 0.3
    # with rate 0 nothing is missing
    assert TrainingMissingSampler("imder", 0.0, list(MODS))(batch)["present"].all()


def test_training_sampler_tokens():
    batch = _batch(b=8)
    s = TrainingMissingSampler("tokens", 0.5, list(MODS), seed=3)
    out = s(batch)
    assert "present" not in out
    for m in MODS:
        real, kept = batch["masks"][m], out["masks"][m]
        assert not (kept & ~real).any() and (kept.sum(1) >= 1).all()
        frac = 1 - kept.sum().item() / real.sum().item()
        assert 0.35 < frac < 0.6
        assert (out["features"][m][~kept] == 0).all()
        torch.testing.assert_close(out["features"][m][kept], batch["features"][m][kept])


def test_training_sampler_rejects_bad_settings():
    with pytest.raises(ConfigError, match="missing_protocol"):
        TrainingMissingSampler("random", 0.1, list(MODS))
    with pytest.raises(ConfigError, match="missing_rate"):
        TrainingMissingSampler("imder", 1.5, list(MODS))
    with pytest.raises(ConfigError, match="modalities"):
        TrainingMissingSampler("imder", 0.1, ["text", "audio", "depth"])(_batch())


# ------------------------------------------------------------------ models with absent modalities


def _cfg(model: str = "alignmamba", **kw) -> AlignMambaConfig:
    base = {
        "model": model,
        "d_model": 16,
        "n_layers": 1,
        "d_state": 4,
        "dropout": 0.0,
        "n_heads": 2,
        "input_dims": {"text": 12, "audio": 5, "vision": 7},
    }
    base.update(kw)
    return AlignMambaConfig(**base)


def _models() -> list[str]:
    names = ["alignmamba"]
    try:
        import alignmamba.baselines  # noqa: F401
        from alignmamba.model import MODELS

        names += sorted(n for n in MODELS if n != "alignmamba")
    except ImportError:
        pass
    return names


# every sample lacks one or two modalities: the six patterns, twice
LACKING = torch.tensor(
    [[0, 1, 1], [1, 0, 1], [1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]] * 2, dtype=torch.bool
)


@pytest.mark.parametrize("name", _models())
def test_every_sample_lacking_modalities_gives_finite_loss_and_grads(name):
    torch.manual_seed(0)
    model = build_model(_cfg(name))
    batch = apply_missing(_batch(b=12), MODS, present=LACKING)
    out = model(batch["features"], batch["masks"], present=batch["present"])
    loss = torch.nn.functional.l1_loss(out.pred.float(), batch["label"]) + out.align_loss
    assert torch.isfinite(out.pred).all() and torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0
    # the modalities that are present still train their encoders
    for m in MODS:
        assert any(
            p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders[m].parameters()
        ), m
    # the same through the protocol itself, at its harshest table rate
    present = torch.from_numpy(sample_modality_mask(12, 0.7, MODS, seed=4))
    assert (present.sum(1) == 1).all()
    b2 = apply_missing(_batch(b=12, seed=1), MODS, present=present)
    out2 = model(b2["features"], b2["masks"], present=b2["present"])
    loss2 = out2.pred.float().abs().mean() + out2.align_loss
    model.zero_grad()
    loss2.backward()
    assert torch.isfinite(loss2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", _models())
def test_token_protocol_through_models_ignores_dropped_tokens(name):
    torch.manual_seed(0)
    model = build_model(_cfg(name)).eval()
    batch = TrainingMissingSampler("tokens", 0.5, list(MODS), seed=0)(_batch(b=6))
    with torch.no_grad():
        a = model(batch["features"], batch["masks"]).pred
        noisy = {
            m: torch.where(batch["masks"][m][..., None], x, torch.randn_like(x) * 5)
            for m, x in batch["features"].items()
        }
        b = model(noisy, batch["masks"]).pred
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ evaluation over rates


@pytest.fixture(scope="module")
def tiny_setup():
    from alignmamba.data import load_mmsa
    from alignmamba.data.synthetic import make_synthetic
    from alignmamba.train import ExperimentConfig, fit_model_config

    ds = load_mmsa(
        make_synthetic(seed=0, aligned=True, n_train=4, n_valid=4, n_test=40),
        "synthetic:tiny",
        inplace=True,
    )
    exp = ExperimentConfig()
    exp.data.eval_batch_size = 16
    mcfg = fit_model_config(_cfg(), ds)
    torch.manual_seed(0)
    model = AlignMamba(mcfg).eval()
    return model, mcfg, exp, ds


class _Spy(torch.nn.Module):
    """Delegates to a model and records the ``present`` it was given, by sample index."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.config, self.seen = model, model.config, []

    def forward(self, features, masks=None, present=None, return_plans=False):
        self.seen.append(present.clone() if present is not None else None)
        return self.model(features, masks, present=present, return_plans=return_plans)


def _args(tmp_path, **kw) -> argparse.Namespace:
    base = {
        "missing_rates": "0.1,0.4,0.7",
        "missing_protocol": "imder",
        "missing_seed": 0,
        "json": None,
        "plot": None,
        "split": "test",
        "checkpoint": "tiny",
    }
    base.update(kw)
    return argparse.Namespace(**base)


def test_evaluate_over_rates_end_to_end(tiny_setup, tmp_path, capsys):
    model, mcfg, exp, ds = tiny_setup
    dev = torch.device("cpu")
    js, png = tmp_path / "rates.json", tmp_path / "rates.png"
    res = evaluate_over_rates(
        model, mcfg, exp, ds, dev, _args(tmp_path, json=str(js), plot=str(png))
    )
    assert [r["missing_rate"] for r in res["rates"]] == [0.1, 0.4, 0.7]
    keys = {
        "Has0_acc_2",
        "Has0_F1_score",
        "Non0_acc_2",
        "Non0_F1_score",
        "Mult_acc_5",
        "Mult_acc_7",
        "MAE",
        "Corr",
    }
    for row in res["rates"]:
        assert keys <= set(row)
    for k in keys:
        vals = [row[k] for row in res["rates"]]
        assert res["average"][k] == pytest.approx(float(np.mean(vals)))
        assert res["drop"][k] == pytest.approx(vals[0] - vals[-1])
    on_disk = json.loads(js.read_text())
    assert {"rates", "average", "drop"} <= set(on_disk)
    assert on_disk["rates"] == res["rates"] and on_disk["drop"] == res["drop"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "average" in printed and "drop" in printed and "Non0_acc_2" in printed
    # same seed -> same numbers; the rate changes the predictions
    again = evaluate_over_rates(model, mcfg, exp, ds, dev, _args(tmp_path))
    assert again["rates"] == res["rates"]


def test_evaluation_masks_fixed_per_sample_whatever_the_batches(tiny_setup, tmp_path):
    from alignmamba.train import evaluate_model

    model, mcfg, exp, ds = tiny_setup
    split = ds.splits["test"]
    n = len(split)
    want = sample_modality_mask(n, 0.4, ds.modalities, seed=11)
    spy = _Spy(model)
    for bs in (16, 7):
        spy.seen.clear()
        exp.data.eval_batch_size = bs
        res = evaluate_over_rates(
            spy,
            mcfg,
            exp,
            ds,
            torch.device("cpu"),
            _args(tmp_path, missing_rates="0.4", missing_seed=11),
        )
        got = torch.cat(spy.seen).numpy()  # the loader does not shuffle: rows in index order
        np.testing.assert_array_equal(
            got, want[:, [ds.modalities.index(m) for m in mcfg.modalities]]
        )
        if bs == 16:
            first = res
    exp.data.eval_batch_size = 16
    for k, v in first["rates"][0].items():  # batch size does not change the result
        assert res["rates"][0][k] == pytest.approx(v, rel=1e-5, abs=1e-6)
    # rate 0 is the complete setting exactly
    from alignmamba.data import make_loader

    full = evaluate_model(model, make_loader(split, 16, False, 0), mcfg, torch.device("cpu"))
    zero = evaluate_over_rates(
        model, mcfg, exp, ds, torch.device("cpu"), _args(tmp_path, missing_rates="0")
    )
    for k, v in full["metrics"].items():
        assert zero["rates"][0][k] == pytest.approx(v, rel=1e-5, abs=1e-6)
    # a different seed gives a different pattern
    other = evaluation_masks(split, 0.4, "imder", mcfg.modalities, seed=12)["present"]
    assert not np.array_equal(
        other, evaluation_masks(split, 0.4, "imder", mcfg.modalities, seed=11)["present"]
    )


def test_evaluation_masks_tokens_and_model_order(tiny_setup):
    _, _, _, ds = tiny_setup
    split = ds.splits["test"]
    a = evaluation_masks(split, 0.3, "tokens", ["text", "audio", "vision"], seed=2)["kept"]
    b = evaluation_masks(split, 0.3, "tokens", ["vision", "text", "audio"], seed=2)["kept"]
    for m in a:
        np.testing.assert_array_equal(a[m], b[m])  # pattern does not depend on the model's order
        real = split.mask(m)
        assert not (a[m] & ~real).any() and (a[m].sum(1) >= 1).all()
        frac = 1 - a[m].sum() / real.sum()
        assert abs(frac - 0.3) < 0.05
    pa = evaluation_masks(split, 0.5, "imder", ["text", "audio", "vision"], seed=2)["present"]
    pb = evaluation_masks(split, 0.5, "imder", ["vision", "text", "audio"], seed=2)["present"]
    np.testing.assert_array_equal(pa[:, [2, 0, 1]], pb)


def test_evaluate_tokens_protocol_runs(tiny_setup, tmp_path):
    model, mcfg, exp, ds = tiny_setup
    res = evaluate_over_rates(
        model,
        mcfg,
        exp,
        ds,
        torch.device("cpu"),
        _args(tmp_path, missing_protocol="tokens", missing_rates="0.2,0.6"),
    )
    assert res["protocol"] == "tokens" and len(res["rates"]) == 2
    assert all(math.isfinite(row["MAE"]) for row in res["rates"])


def test_parse_rates_and_summary():
    assert parse_rates("0.1, 0.2,0.7") == [0.1, 0.2, 0.7]
    for bad in ("", "0.1,x", "0.1,1.5", "0.1,0.1", "-0.2"):
        with pytest.raises(ConfigError, match="--missing-rates"):
            parse_rates(bad)
    avg, drop = summarize_rates([{"missing_rate": 0.7, "a": 0.5}, {"missing_rate": 0.1, "a": 0.9}])
    assert avg == {"a": pytest.approx(0.7)} and drop == {"a": pytest.approx(0.4)}


# ------------------------------------------------------------------ CLI on a 1-epoch checkpoint


def test_cli_evaluate_missing_rates(tmp_path, capsys):
    from alignmamba.cli import main
    from alignmamba.train import resolve_config, run_experiment

    cfg = resolve_config(
        "synthetic",
        None,
        [
            "data.synthetic_n_train=48",
            "data.synthetic_n_valid=16",
            "data.synthetic_n_test=24",
            "data.synthetic_aligned=true",
            "model.d_model=16",
            "model.n_layers=1",
            "model.d_state=4",
            "train.epochs=1",
            "train.quiet=true",
            "train.device=cpu",
            f"train.out={tmp_path / 'run'}",
            "train.seeds=5",
        ],
        missing_protocol="imder",
        missing_rate=-1.0,
    )
    run_experiment(cfg, log=lambda *a: None)
    ckpt = tmp_path / "run" / "seed_5" / "best"
    js = tmp_path / "m.json"
    rc = main(
        [
            "evaluate",
            "--checkpoint",
            str(ckpt),
            "--missing-rates",
            "0.1,0.4,0.7",
            "--json",
            str(js),
            "--device",
            "cpu",
            "--plot",
            str(tmp_path / "m.png"),
        ]
    )
    assert rc == 0
    res = json.loads(js.read_text())
    assert [r["missing_rate"] for r in res["rates"]] == [0.1, 0.4, 0.7]
    assert set(res["average"]) == set(res["drop"]) and "Non0_acc_2" in res["average"]
    assert (tmp_path / "m.png").stat().st_size > 1000
    capsys.readouterr()
    assert (
        main(
            ["evaluate", "--checkpoint", str(ckpt), "--missing-rates", "0.1,abc", "--device", "cpu"]
        )
        == 2
    )
    assert "--missing-rates" in capsys.readouterr().err


def test_align_loss_is_the_mean_over_samples_where_each_term_is_defined(mmd_calls):
    """L_align with absent modalities: each source's MMD^2 is averaged over the samples that
    have both it and the anchor (not over the whole batch, which would shrink the regulariser
    with the missing rate); no defined sample gives 0 for that source."""
    seen = mmd_calls
    cfg = _cfg(align_lambda=0.6)
    torch.manual_seed(1)
    model = AlignMamba(cfg).eval()
    batch = _batch(b=6, seed=3)
    # columns text (anchor), audio, vision
    present = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        complete = model(batch["features"], batch["masks"], align_loss=True).align_loss
        mmd_full = list(seen)
        seen.clear()
        got = model(batch["features"], batch["masks"], present=present, align_loss=True).align_loss
    assert len(seen) == 2
    want = 0.0
    for i, m in enumerate(("audio", "vision")):
        rows = [b for b in range(6) if present[b, 0] and present[b, i + 1]]
        # the defined terms are those of the complete batch (OT to a present anchor is unchanged)
        torch.testing.assert_close(seen[i][rows], mmd_full[i][rows])
        want += sum(float(seen[i][b]) for b in rows) / len(rows)
    want *= cfg.align_lambda
    assert abs(float(got) - want) < 1e-5 * max(1.0, want)
    # the batch-wide mean (the former formula) would be half of it: each source is defined
    # for 3 of the 6 samples
    old = cfg.align_lambda * float(sum((s * w).mean() for s, w in zip(
        seen, (present[:, 0] & present[:, 1], present[:, 0] & present[:, 2]))))
    assert want > 0 and abs(old - 0.5 * want) < 1e-5 * max(1.0, want)
    assert float(complete) > 0
    # no sample with the anchor and vision: that source contributes 0, not NaN
    seen.clear()
    none_v = present.clone()
    none_v[:, 2] = False
    with torch.no_grad():
        only_audio = model(batch["features"], batch["masks"], present=none_v, align_loss=True).align_loss
    rows = [b for b in range(6) if none_v[b, 0] and none_v[b, 1]]
    assert torch.isfinite(only_audio)
    assert abs(float(only_audio) - cfg.align_lambda * float(seen[0][rows].mean())) < 1e-5
