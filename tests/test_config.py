"""Strict config: presets, files, dotted overrides that fail loudly."""
import json

import pytest

from alignmamba.config import apply_overrides, to_dict
from alignmamba.errors import ConfigError
from alignmamba.train import ExperimentConfig, resolve_config


def test_overrides_typed_and_nested():
    cfg = resolve_config("synthetic", None, ["model.d_model=32", "optim.lr=3e-4", "train.seeds=[1,2]",
                                             "model.use_ot=false", "data.path=none", "model.interleave_order=audio,vision,text"])
    assert cfg.model.d_model == 32 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.seeds == [1, 2] and cfg.model.use_ot is False and cfg.data.path is None
    assert cfg.model.interleave_order == ["audio", "vision", "text"]


@pytest.mark.parametrize("bad,msg", [
    ("model.d_modle=3", "unknown key 'd_modle'"),
    ("model.d_model=abc", "expected an integer"),
    ("model.use_ot=maybe", "expected true/false"),
    ("nosection.x=1", "unknown key 'nosection'"),
    ("model=3", "is a section"),
    ("model.d_model", "expected key=value"),
    ("model.fusion=sideways", "fusion"),
    ("optim.name=lbfgs", "optim.name"),
])
def test_bad_overrides_fail_loudly(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        resolve_config("synthetic", None, [bad])


def test_file_then_flags_then_overrides(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"model": {"d_model": 40}, "train": {"epochs": 3}}))
    cfg = resolve_config(None, str(p), ["train.epochs=5"], epochs=4)
    assert cfg.model.d_model == 40 and cfg.train.epochs == 5
    cfg = resolve_config(None, str(p), [], epochs=4)
    assert cfg.train.epochs == 4
    p.write_text(json.dumps({"model": {"width": 40}}))
    with pytest.raises(ConfigError, match="unknown key 'width'"):
        resolve_config(None, str(p), [])
    with pytest.raises(ConfigError, match="not found"):
        resolve_config(None, str(tmp_path / "missing.yaml"), [])


def test_yaml_file(tmp_path):
    pytest.importorskip("yaml")
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  n_layers: 3\noptim:\n  betas: [0.8, 0.99]\n")
    cfg = resolve_config("mosi", str(p), [])
    assert cfg.model.n_layers == 3 and cfg.optim.betas == [0.8, 0.99]
    assert cfg.train.seeds == [1111, 1112, 1113, 1114, 1115]  # the MOSI preset
    p.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        resolve_config(None, str(p), [])


def test_round_trip_to_dict():
    cfg = ExperimentConfig()
    again = apply_overrides(cfg, ["train.epochs=2"])
    d = to_dict(again)
    assert d["train"]["epochs"] == 2 and d["model"]["modalities"] == ["text", "audio", "vision"]
