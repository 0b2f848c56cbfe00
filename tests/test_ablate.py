"""Ablation runner (alignmamba/ablate.py): variants, table, CLI, resume."""
from __future__ import annotations

import json

import pytest
import torch

from alignmamba import ablate
from alignmamba.cli import main
from alignmamba.errors import ConfigError
from alignmamba.train import resolve_config

TINY = ["data.synthetic_n_train=48", "data.synthetic_n_valid=16", "data.synthetic_n_test=16",
        "data.batch_size=16", "model.d_model=16", "model.n_layers=1", "train.threads=1"]


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_variant_configs_differ_only_where_they_should(tmp_path):
    base = resolve_config("synthetic", None, TINY, seeds=[1], epochs=1)
    cfgs = {name: ablate.variant_config(base, name, tmp_path) for name in ablate.VARIANTS}
    assert cfgs["alignmamba"].model == base.model
    assert cfgs["no_ot"].model.use_ot is False and cfgs["no_ot"].model.use_mmd is True
    assert cfgs["no_mmd"].model.use_mmd is False and cfgs["no_mmd"].model.use_ot is True
    assert not cfgs["no_ot_no_mmd"].model.use_ot and not cfgs["no_ot_no_mmd"].model.use_mmd
    assert cfgs["sinkhorn"].model.ot_plan == "sinkhorn"
    assert cfgs["order_aware"].model.ot_time_beta == 1.0
    for name in ("transformer_single", "transformer_multi", "mamba_single", "mamba_multi"):
        assert cfgs[name].model.model == name
    for name, cfg in cfgs.items():
        assert cfg.train.out == str(tmp_path / name)
        assert cfg.data == base.data and cfg.optim == base.optim and cfg.train.seeds == [1]
    assert base.train.out != str(tmp_path / "alignmamba")  # the base config is not modified


def test_ablate_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "abl"
    common = ["ablate", "--out", str(out), "--seeds", "1", "2", "--epochs", "1", "--quiet"]
    for kv in TINY:
        common += ["--set", kv]
    args = common + ["--variants", "alignmamba", "mamba_multi"]
    assert main(args) == 0
    report = json.loads((out / "ablation.json").read_text())
    assert report["seeds"] == [1, 2] and report["delta_key"] == "Non0_acc_2"
    assert [v["name"] for v in report["variants"]] == ["alignmamba", "mamba_multi"]
    metrics = {"Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score", "Mult_acc_5", "Mult_acc_7",
               "MAE", "Corr"}
    for v in report["variants"]:
        assert set(v["test"]) == metrics and set(v["test_std"]) == metrics
        assert (out / v["name"] / "metrics.json").is_file()
        seeds = json.loads((out / v["name"] / "metrics.json").read_text())["seeds"]
        assert [s["seed"] for s in seeds] == [1, 2]
        expected = (v["test"]["Non0_acc_2"] - report["variants"][0]["test"]["Non0_acc_2"]) * 100
        assert v["delta"] == pytest.approx(expected)
    assert report["variants"][0]["delta"] == 0.0
    # the variants really were different models / configs
    assert json.loads((out / "mamba_multi" / "config.json").read_text())["model"]["model"] == "mamba_multi"
    assert json.loads((out / "alignmamba" / "config.json").read_text())["model"]["model"] == "alignmamba"
    md = (out / "ablation.md").read_text()
    assert md.count("\n| ") == 3  # header + 2 variants (the separator starts with "|---")
    assert "Non0_acc_2" in md and "± " in md and "mamba_multi" in md
    # --resume reuses finished variants with the same config instead of training again
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    assert capsys.readouterr().out.count("reusing") == 2
    # ... but not when the shared config changed
    assert main(common + ["--variants", "alignmamba", "--resume", "--set", "model.dropout=0.2"]) == 0
    assert "reusing" not in capsys.readouterr().out


def test_unknown_variant_is_a_user_error(tmp_path, capsys):
    assert main(["ablate", "--out", str(tmp_path), "--variants", "alignmamba", "nope"]) == 2
    assert "--variants: unknown variant 'nope'" in capsys.readouterr().err
    base = resolve_config("synthetic", None, TINY, seeds=[1], epochs=1)
    with pytest.raises(ConfigError):
        ablate.run_ablation(base, [], tmp_path)


def test_bad_variant_combination_fails_before_training(tmp_path, monkeypatch):
    from alignmamba import train

    def must_not_train(*a, **k):
        raise AssertionError("trained before checking every variant")

    monkeypatch.setattr(train, "run_experiment", must_not_train)
    # a BERT text encoder exists for AlignMamba only: the baseline variant's config is invalid
    base = resolve_config("synthetic", None, TINY + ["model.text_encoder=bert", "model.bert_config={}"],
                          seeds=[1], epochs=1)
    with pytest.raises(ConfigError, match="text_encoder"):
        ablate.run_ablation(base, ["alignmamba", "mamba_single"], tmp_path)


def test_format_without_reference():
    report = {"seeds": [1], "data": "x", "epochs": 1, "delta_key": "Non0_acc_2", "variants": [
        {"name": "mamba_single", "description": "d", "test": {"Non0_acc_2": 0.5, "MAE": 1.25},
         "test_std": {"Non0_acc_2": 0.1, "MAE": 0.5}, "delta": None}]}
    md = ablate.format_ablation(report)
    assert "| mamba_single (d) | 50.00 ± 10.00 | 1.25 ± 0.50 | - |" in md


def test_jobs_give_the_same_table_as_one_process(tmp_path, capsys):
    """--jobs trains (variant, seed) runs in worker processes; the table must equal the serial one."""
    common = ["ablate", "--seeds", "1", "2", "--epochs", "1", "--quiet", "--device", "cpu",
              "--variants", "alignmamba", "no_mmd"]
    for kv in TINY:
        common += ["--set", kv]
    assert main(common + ["--out", str(tmp_path / "serial")]) == 0
    assert main(common + ["--out", str(tmp_path / "par"), "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 run(s), up to 2 at a time" in out and sum(ln.startswith("   finished ") for ln in out.splitlines()) == 4
    serial = json.loads((tmp_path / "serial" / "ablation.json").read_text())
    par = json.loads((tmp_path / "par" / "ablation.json").read_text())
    for a, b in zip(serial["variants"], par["variants"], strict=True):
        assert a["name"] == b["name"]
        for k, v in a["test"].items():
            assert b["test"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (a["name"], k)
        seeds = json.loads((tmp_path / "par" / b["name"] / "metrics.json").read_text())["seeds"]
        assert [s["seed"] for s in seeds] == [1, 2]
        assert (tmp_path / "par" / b["name"] / "seed_2.log").is_file()
    # a second --jobs --resume run trains nothing
    assert main(common + ["--out", str(tmp_path / "par"), "--jobs", "2", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "started" not in out and out.count("reusing") == 2


def test_jobs_failure_is_reported(tmp_path, capsys):
    args = ["ablate", "--seeds", "1", "--epochs", "1", "--quiet", "--device", "cpu", "--jobs", "2",
            "--variants", "alignmamba", "--out", str(tmp_path), "--data", str(tmp_path / "nope.pkl")]
    assert main(args) == 2
    assert "nope.pkl" in capsys.readouterr().err


def test_jobs_must_be_positive(tmp_path, capsys):
    assert main(["ablate", "--out", str(tmp_path), "--jobs", "0"]) == 2
    assert "--jobs: must be >= 1" in capsys.readouterr().err


def test_resume_treats_keys_missing_from_an_old_config_as_defaults(tmp_path):
    """A run directory written before an option existed still matches when the option is at its default."""
    base = resolve_config("synthetic", None, TINY, seeds=[1], epochs=1)
    cfg = ablate.variant_config(base, "alignmamba", tmp_path)
    from alignmamba.config import to_dict
    d = to_dict(cfg)
    del d["train"]["cuda_graphs"]  # pretend a version without that option wrote it
    (tmp_path / "alignmamba").mkdir()
    (tmp_path / "alignmamba" / "config.json").write_text(json.dumps(d))
    assert ablate._config_matches(cfg, tmp_path / "alignmamba")
    cfg.train.cuda_graphs = True  # not the default any more: a different run
    assert not ablate._config_matches(cfg, tmp_path / "alignmamba")
