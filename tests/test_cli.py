"""The real command line end to end on a tiny generated file.

``data synth`` -> ``data inspect`` -> ``train`` -> ``evaluate`` (reproduces the test metrics
of metrics.json exactly) -> ``plot-plan``; plus ``python -m alignmamba --help`` once.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import subprocess
import sys
import warnings
from typing import Any

import pytest
import torch

from alignmamba.cli import main
from alignmamba.data import load_dataset

SIZES = ["--n-train", "48", "--n-valid", "16", "--n-test", "16"]
TINY = ["--quiet", "--set", "model.d_model=16", "--set", "model.n_layers=1", "--set", "model.d_state=4",
        "--set", "train.threads=1", "--set", "data.batch_size=16"]


def cli(*args: Any) -> tuple[int, str, str]:
    """``alignmamba ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            rc = int(e.code or 0)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The whole pipeline once; each test checks one step's results."""
    root = tmp_path_factory.mktemp("cli")
    f, d = root / "f.pkl", root / "run"
    threads = torch.get_num_threads()
    res = {"root": root, "file": f, "out": d}
    res["synth"] = cli("data", "synth", "--like", "mosi", "--out", f, "--seed", "5", *SIZES)
    res["inspect"] = cli("data", "inspect", f)
    res["train"] = cli("train", "--data", f, "--epochs", "1", "--out", d, *TINY)
    best = d / "seed_1111" / "best"
    res["eval_test"] = cli("evaluate", "--checkpoint", best, "--data", f, "--json", root / "m.json")
    res["eval_valid"] = cli("evaluate", "--checkpoint", best, "--data", f, "--split", "valid",
                            "--json", root / "v.json")
    res["plot"] = cli("plot-plan", "--checkpoint", best, "--data", f, "--index", "2", "--out", root / "p.png")
    torch.set_num_threads(threads)
    return res


def test_data_synth_writes_a_loadable_mmsa_file(run):
    rc, out, err = run["synth"]
    assert rc == 0, err
    assert out.strip() == f"wrote {run['file']}"
    ds = load_dataset(run["file"])
    assert ds.schema == "mmsa" and not ds.aligned
    assert [len(ds[s]) for s in ("train", "valid", "test")] == [48, 16, 16]
    assert ds.input_dims == {"text": 768, "audio": 5, "vision": 20}


def test_data_inspect_reports_the_file(run):
    rc, out, err = run["inspect"]
    assert rc == 0, err
    assert out.startswith(f"file: {run['file']}")
    assert "schema: MMSA, unaligned, modalities ['text', 'audio', 'vision']" in out
    for split, n in (("train", 48), ("valid", 16), ("test", 16)):
        assert f"{split}: {n} samples" in out
    assert "audio_lengths" in out and "regression_labels" in out
    assert "suspicious:" in out


def test_train_writes_the_run_directory(run):
    rc, out, err = run["train"]
    assert rc == 0, err
    d = run["out"]
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["model"] == "alignmamba" and metrics["data"] == str(run["file"])
    assert {"Has0_acc_2", "Non0_acc_2", "Non0_F1_score", "Mult_acc_7", "MAE", "Corr"} <= set(metrics["test"])
    assert [r["seed"] for r in metrics["seeds"]] == [1111]
    config = json.loads((d / "config.json").read_text())
    assert config["data"]["path"] == str(run["file"]) and config["model"]["d_model"] == 16
    assert config["model"]["input_dims"] == {"text": 768, "audio": 5, "vision": 20}
    s = d / "seed_1111"
    for name in ("best/config.json", "best/model.safetensors", "last/model.safetensors",
                 "last/train_state.json", "log.csv", "test_predictions.csv", "result.json"):
        assert (s / name).is_file(), name
    with open(s / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["epoch"] == "1"
    with open(s / "test_predictions.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 16
    assert "seed 1111 epoch   1" in out and "Non0_acc_2" in out and f"results in {d}" in out


def test_evaluate_reproduces_the_test_metrics_exactly(run):
    rc, out, err = run["eval_test"]
    assert rc == 0, err
    metrics = json.loads((run["out"] / "metrics.json").read_text())
    got = json.loads((run["root"] / "m.json").read_text())
    assert got["split"] == "test" and got["data"] == str(run["file"])
    assert {k: got[k] for k in metrics["test"]} == metrics["test"]  # bit for bit, not approximately
    assert got["loss"] == metrics["seeds"][0]["test_loss"]
    assert "test metric" in out and "Non0_acc_2" in out


def test_evaluate_valid_split_matches_training_record(run):
    rc, _, err = run["eval_valid"]
    assert rc == 0, err
    metrics = json.loads((run["out"] / "metrics.json").read_text())
    got = json.loads((run["root"] / "v.json").read_text())
    assert {k: got[k] for k in metrics["valid"]} == metrics["valid"]
    assert got["loss"] == metrics["seeds"][0]["valid_loss"]


def test_plot_plan_writes_a_png(run):
    rc, out, err = run["plot"]
    assert rc == 0, err
    png = run["root"] / "p.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert out.strip() == f"wrote {png}"


def test_python_dash_m_help():
    proc = subprocess.run([sys.executable, "-m", "alignmamba", "--help"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: alignmamba")
    for cmd in ("train", "evaluate", "data", "plot-plan", "ablate", "bench"):
        assert cmd in proc.stdout


def test_usage_errors_exit_2(run, tmp_path):
    for args in (["frobnicate"], ["train", "--epochs", "many"], ["evaluate"], ["data", "synth"]):
        rc, _out, err = cli(*args)
        assert rc == 2 and "usage: alignmamba" in err and "Traceback" not in err, args
    # a user mistake the parser cannot see: one line, exit 2
    rc, _, err = cli("data", "synth", "--out", tmp_path / "no" / "dir" / "f.pkl", *SIZES)
    assert rc == 2 and err.count("\n") == 1 and "does not exist" in err
    rc, _, err = cli("evaluate", "--checkpoint", tmp_path / "nothing", "--data", run["file"])
    assert rc == 2 and err.strip() == f"alignmamba: error: {tmp_path / 'nothing'}: checkpoint directory not found"
    rc, _, err = cli("train", "--data", run["file"], "--out", tmp_path / "r", "--set", "model.d_modle=3")
    assert rc == 2 and err.count("\n") == 1 and "d_modle" in err
    assert not (tmp_path / "r").exists()


def test_plot_plan_with_a_bert_checkpoint(run, tmp_path):
    """A checkpoint with the BERT text encoder: plot-plan feeds the batch's text_bert ids."""
    transformers = pytest.importorskip("transformers")
    from alignmamba.data.synthetic import SEP_ID, VOCAB, WORD_ID_OFFSET
    from alignmamba.model import AlignMamba, AlignMambaConfig

    threads = torch.get_num_threads()
    torch.manual_seed(0)
    bcfg = transformers.BertConfig(vocab_size=max(SEP_ID, WORD_ID_OFFSET + len(VOCAB)) + 11, hidden_size=32,
                                   num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                   max_position_embeddings=64)
    with contextlib.redirect_stderr(io.StringIO()):
        transformers.BertModel(bcfg).save_pretrained(str(tmp_path / "bert"))
    cfg = AlignMambaConfig(input_dims={"text": 768, "audio": 5, "vision": 20}, d_model=16, n_layers=1, d_state=4,
                           text_encoder="bert", bert_path=str(tmp_path / "bert"))
    AlignMamba(cfg).save_pretrained(tmp_path / "ckpt")
    png = tmp_path / "b.png"
    rc, out, err = cli("plot-plan", "--checkpoint", tmp_path / "ckpt", "--data", run["file"], "--index", "1",
                       "--out", png)
    torch.set_num_threads(threads)
    assert rc == 0, err
    assert out.strip() == f"wrote {png}"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_cuda_graphs_flag_sets_the_config_and_resume_refuses_it(tmp_path, capsys):
    from alignmamba.train import resolve_config

    assert resolve_config(None, None, [], cuda_graphs=True).train.cuda_graphs is True
    assert resolve_config(None, None, []).train.cuda_graphs is False
    assert main(["train", "--resume", str(tmp_path), "--cuda-graphs"]) == 2
    assert "--cuda-graphs" in capsys.readouterr().err
