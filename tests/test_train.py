"""train.deterministic (train.py ``deterministic_mode``): the flags it sets and restores, the CLI
flag, the same results as the default run on CPU; on CUDA (skipped elsewhere) two runs repeat
bitwise, weights included.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignmamba import train as T
from alignmamba.cli import main

TINY = ["data.synthetic_n_train=52", "data.synthetic_n_valid=20", "data.synthetic_n_test=12",
        "model.d_model=40", "model.n_layers=1", "model.d_state=4", "data.batch_size=16",
        "data.eval_batch_size=8", "train.quiet=true", "train.patience=50", "train.epochs=2"]


def _flags() -> tuple:
    cudnn = torch.backends.cudnn
    return (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(), cudnn.deterministic,
            cudnn.benchmark)


def test_deterministic_mode_sets_and_restores_the_flags(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = _flags()
    assert before[0] is False  # the suite runs without it
    with T.deterministic_mode(False):
        assert _flags() == before
    with T.deterministic_mode(True):
        assert _flags()[:3] == (True, False, True) and _flags()[3] is False
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert _flags() == before
    with pytest.raises(RuntimeError, match="boom"), T.deterministic_mode(True):
        raise RuntimeError("boom")
    assert _flags() == before


def test_deterministic_flag_sets_the_config_and_resume_refuses_it(tmp_path, capsys):
    assert T.TrainConfig().deterministic is False  # documented default: off
    assert T.resolve_config(None, None, [], deterministic=True).train.deterministic is True
    assert T.resolve_config(None, None, ["train.deterministic=true"]).train.deterministic is True
    assert main(["train", "--resume", str(tmp_path), "--deterministic"]) == 2
    assert "--deterministic" in capsys.readouterr().err


def _run(tmp_path: Path, name: str, *extra: str) -> tuple[dict, dict]:
    cfg = T.resolve_config("synthetic", overrides=[*TINY, f"train.out={tmp_path / name}", *extra])
    seen = []
    real = T._train_one_seed

    def spy(*a, **k):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real(*a, **k)

    T._train_one_seed = spy
    try:
        metrics = T.run_experiment(cfg, log=lambda *a: None)
    finally:
        T._train_one_seed = real
    assert seen == [cfg.train.deterministic]
    assert torch.are_deterministic_algorithms_enabled() is False  # restored after the run
    weights = load_file(str(tmp_path / name / "seed_1111" / "best" / "model.safetensors"))
    return metrics, weights


def test_deterministic_cpu_run_equals_the_default_run(tmp_path):
    """On CPU every kernel is deterministic already: the flag changes nothing in the results."""
    m0, w0 = _run(tmp_path, "default", "train.device=cpu")
    m1, w1 = _run(tmp_path, "det", "train.device=cpu", "train.deterministic=true")
    assert m0["test"] == m1["test"] and m0["seeds"][0]["valid_loss"] == m1["seeds"][0]["valid_loss"]
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_deterministic_cuda_runs_repeat_bitwise(tmp_path):
    """Two CUDA runs with train.deterministic (bf16 autocast, the CUDA scan, 80 channels = 3
    channel blocks per group whose dB/dC sums meet, OT collisions) end with the same weights
    and metrics, bit for bit."""
    runs = [_run(tmp_path, f"r{i}", "train.device=cuda", "train.deterministic=true")
            for i in range(2)]
    (m0, w0), (m1, w1) = runs
    assert m0["test"] == m1["test"] and m0["seeds"][0]["valid_loss"] == m1["seeds"][0]["valid_loss"]
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)


def test_evaluate_follows_the_checkpoint_setting(tmp_path, monkeypatch, capsys):
    """``alignmamba evaluate`` runs a deterministic run's checkpoint under the same mode (and
    gives its training record's test metrics); a default checkpoint evaluates without it."""
    import json

    seen = []
    real = T.evaluate_model
    monkeypatch.setattr(T, "evaluate_model",
                        lambda *a, **k: seen.append(torch.are_deterministic_algorithms_enabled())
                        or real(*a, **k))
    for name, det in (("det", "true"), ("default", "false")):
        metrics, _ = _run(tmp_path, name, "train.device=cpu", f"train.deterministic={det}")
        seen.clear()
        out = tmp_path / f"{name}.json"
        best = tmp_path / name / "seed_1111" / "best"
        assert main(["evaluate", "--checkpoint", str(best), "--device", "cpu", "--json", str(out)]) == 0
        assert seen == [det == "true"]
        got = json.loads(out.read_text())
        assert {k: got[k] for k in metrics["test"]} == metrics["test"]
    assert torch.are_deterministic_algorithms_enabled() is False
    capsys.readouterr()


DET_VARIANTS = {
    "no_ot": ["model.use_ot=false"], "sinkhorn": ["model.ot_plan=sinkhorn"],
    "ot_mean": ["model.ot_normalize=mean"], "mmd_median": ["model.mmd_bandwidth=median"],
    "mmd_multi": ["model.mmd_bandwidth=multi"], "concat": ["model.fusion=concat"],
    "conv_encoder": ["model.encoder=conv"],
    "missing_imder": ["data.missing_protocol=imder", "data.missing_rate=-1"],
    "missing_tokens": ["data.missing_protocol=tokens", "data.missing_rate=0.3"],
    "transformer_single": ["model.model=transformer_single"],
    "transformer_multi": ["model.model=transformer_multi"],
    "mamba_single": ["model.model=mamba_single"], "mamba_multi": ["model.model=mamba_multi"],
    "cuda_graphs": ["train.cuda_graphs=true"], "fp32": ["train.amp=false"],
}


@pytest.mark.parametrize("extra", DET_VARIANTS.values(), ids=DET_VARIANTS.keys())
def test_deterministic_training_runs_with_every_option(tmp_path, extra):
    """No op on any model or option path lacks a deterministic implementation (PyTorch raises
    for those under the flag: torch.nanmedian did on CUDA, for the median MMD bandwidth). On
    CUDA where there is one, else on CPU (CUDA graphs then fall back to eager with a warning)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _run(tmp_path, "run", f"train.device={device}", "train.deterministic=true", "train.epochs=1",
         "data.synthetic_n_train=32", *extra)
