"""The fine-tuned BERT text encoder (text_encoder.py, model.text_encoder="bert").

A tiny randomly initialised BERT is written with ``save_pretrained`` to a temporary
directory; the synthetic MMSA pickle carries ``text_bert`` ids consistent with its words.
Tests that need transformers skip without it, except the ones that simulate its absence.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from alignmamba.cli import main
from alignmamba.data import load_dataset, make_loader
from alignmamba.data.synthetic import SEP_ID, VOCAB, WORD_ID_OFFSET
from alignmamba.errors import AlignMambaError, CheckpointError, ConfigError, DataError
from alignmamba.model import AlignMamba, AlignMambaConfig, build_model
from alignmamba.text_encoder import INSTALL_HINT, BertTextEncoder
from alignmamba.train import OptimConfig, forward_batch, make_optimizer, param_groups

VOCAB_SIZE = max(SEP_ID, WORD_ID_OFFSET + len(VOCAB)) + 11  # 2064: every id the generator emits
SIZES = ["--n-train", "48", "--n-valid", "16", "--n-test", "16"]
TINY = ["--quiet", "--seeds", "1", "--set", "model.d_model=16", "--set", "model.n_layers=1",
        "--set", "model.d_state=4", "--set", "train.threads=1", "--set", "data.batch_size=16"]
BERT_PREFIX = "encoders.text.bert."


def cli(*args: Any) -> tuple[int, str, str]:
    """``alignmamba ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            rc = int(e.code or 0)
    torch.set_num_threads(threads)
    return rc, out.getvalue(), err.getvalue()


def save_tiny_bert(path: Path, seed: int = 0) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    with contextlib.redirect_stderr(io.StringIO()):  # save progress bar
        transformers.BertModel(cfg).save_pretrained(str(path))
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops: one thread avoids the oversubscription stalls of a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    f = tmp_path_factory.mktemp("bertdata") / "f.pkl"
    rc, _, err = cli("data", "synth", "--like", "mosi", "--out", f, *SIZES)
    assert rc == 0, err
    return f


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT directory (read-only for the tests)."""
    return save_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert")


@pytest.fixture(scope="module")
def batch(data_file: Path) -> dict[str, Any]:
    ds = load_dataset(data_file)
    return next(iter(make_loader(ds.splits["train"], 8, shuffle=False, seed=0)))


def tiny_config(bert_dir: Path, **kw: Any) -> AlignMambaConfig:
    base = {"input_dims": {"text": 768, "audio": 5, "vision": 20}, "d_model": 16, "n_layers": 1, "d_state": 4,
            "text_encoder": "bert", "bert_path": str(bert_dir)}
    return AlignMambaConfig(**{**base, **kw})


# ------------------------------------------------------------------ end to end through the CLI

@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, data_file: Path) -> dict[str, Any]:
    """Train one epoch with a fine-tuned BERT, then evaluate the checkpoint with the BERT
    directory gone (the checkpoint alone must rebuild the encoder)."""
    root = tmp_path_factory.mktemp("bertrun")
    bdir = save_tiny_bert(root / "bert", seed=1)
    initial = {k: v.clone() for k, v in AlignMamba(tiny_config(bdir)).state_dict().items()
               if k.startswith(BERT_PREFIX)}
    out = root / "run"
    res: dict[str, Any] = {"out": out, "initial": initial, "root": root}
    res["train"] = cli("train", "--data", data_file, "--epochs", "1", "--out", out, "--text-encoder", "bert",
                       "--bert-path", bdir, *TINY)
    shutil.rmtree(bdir)
    res["eval"] = cli("evaluate", "--checkpoint", out / "seed_1" / "best", "--data", data_file,
                      "--json", root / "m.json")
    return res


def test_cli_trains_with_bert_and_evaluate_reproduces_the_test_metrics(run):
    rc, _, err = run["train"]
    assert rc == 0, err
    rc, _, err = run["eval"]
    assert rc == 0, err
    trained = json.loads((run["out"] / "metrics.json").read_text())["test"]
    evaluated = json.loads((run["root"] / "m.json").read_text())
    assert trained  # the metrics exist
    for k, v in trained.items():
        assert evaluated[k] == v, k  # exactly: same weights, same batches, CPU


def test_checkpoint_holds_the_fine_tuned_bert_and_its_config(run):
    from safetensors.torch import load_file

    best = run["out"] / "seed_1" / "best"
    cfg = json.loads((best / "config.json").read_text())["model"]
    assert cfg["text_encoder"] == "bert"
    bc = cfg["bert_config"]
    assert (bc["model_type"], bc["vocab_size"], bc["hidden_size"], bc["num_hidden_layers"]) == ("bert", VOCAB_SIZE, 32, 2)
    state = load_file(str(best / "model.safetensors"))
    bert = {k: v for k, v in state.items() if k.startswith(BERT_PREFIX)}
    assert set(bert) == set(run["initial"])
    assert not any(k.startswith("encoders.text.net") for k in state)  # no frozen-feature encoder
    assert not any(".pooler." in k for k in state)
    # the BERT was fine-tuned (its weights moved), but stayed close to the pre-trained ones
    moved = [k for k in bert if not torch.equal(bert[k], run["initial"][k])]
    assert "encoders.text.bert.encoder.layer.1.output.dense.weight" in moved
    w = "encoders.text.bert.encoder.layer.0.attention.self.query.weight"
    assert (bert[w] - run["initial"][w]).abs().max() < 1e-2  # bert_lr 2e-5, a few steps


def test_run_config_records_the_flags(run):
    exp = json.loads((run["out"] / "config.json").read_text())
    assert exp["model"]["text_encoder"] == "bert" and exp["model"]["bert_path"].endswith("bert")
    assert exp["optim"]["bert_lr"] == 2e-5 and exp["optim"]["bert_weight_decay"] == 0.01


# ------------------------------------------------------------------ optimizer groups and freezing

def _group_of(opt: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    return {id(p): g for g in opt.param_groups for p in g["params"]}


def test_bert_parameters_get_their_own_lr_and_weight_decay(bert_dir):
    model = build_model(tiny_config(bert_dir))
    opt = make_optimizer(model, OptimConfig(lr=1e-3, weight_decay=1e-4, bert_lr=3e-5, bert_weight_decay=0.02))
    where = _group_of(opt)
    names = dict(model.named_parameters())
    assert len(where) == len(names) == sum(len(g["params"]) for g in opt.param_groups)  # each once
    n_bert = 0
    for name, p in names.items():
        g = where[id(p)]
        if name.startswith(BERT_PREFIX):
            n_bert += 1
            assert g["lr"] == 3e-5, name
            no_decay = name.endswith(".bias") or ".LayerNorm." in name
            assert g["weight_decay"] == (0.0 if no_decay else 0.02), name
        else:
            assert g["lr"] == 1e-3, name
            assert g["weight_decay"] in (1e-4, 0.0), name
    assert n_bert == sum(1 for n in names if n.startswith(BERT_PREFIX)) > 20
    # the projection after BERT learns at the main rate, with the main decay
    assert where[id(names["encoders.text.proj.weight"])]["weight_decay"] == 1e-4
    assert where[id(names["encoders.text.bert.embeddings.word_embeddings.weight"])]["weight_decay"] == 0.02
    # no BERT: the groups of before, no empty extra ones
    plain = AlignMamba(AlignMambaConfig(d_model=16, n_layers=1, d_state=4))
    assert len(param_groups(plain, 1e-4, 2e-5, 0.01)) == 2


def test_frozen_layers_are_left_out_and_unchanged_after_a_step(bert_dir, batch):
    torch.manual_seed(0)
    model = build_model(tiny_config(bert_dir, bert_freeze_layers=1))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("encoders.text.bert.embeddings.", "encoders.text.bert.encoder.layer.0."))
                          for n in frozen)
    assert any(n.startswith("encoders.text.bert.embeddings.") for n in frozen)
    trainable_bert = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith(BERT_PREFIX)]
    assert trainable_bert and all(n.startswith("encoders.text.bert.encoder.layer.1.") for n in trainable_bert)
    opt = make_optimizer(model, OptimConfig(lr=1e-2, bert_lr=1e-2, bert_weight_decay=0.1))
    in_opt = set(_group_of(opt))
    params = dict(model.named_parameters())
    assert not any(id(params[n]) in in_opt for n in frozen)
    before = {n: p.detach().clone() for n, p in params.items()}
    model.train()
    out = forward_batch(model, batch)
    (out.pred - batch["label"]).abs().mean().add(out.align_loss).backward()
    assert all(params[n].grad is None for n in frozen)  # no gradient is even computed for them
    opt.step()
    for n in frozen:
        assert torch.equal(params[n], before[n]), n
    changed = [n for n in trainable_bert if not torch.equal(params[n], before[n])]
    assert "encoders.text.bert.encoder.layer.1.attention.self.query.weight" in changed
    assert not torch.equal(params["encoders.text.proj.weight"], before["encoders.text.proj.weight"])


def test_freezing_every_layer_and_too_many(bert_dir):
    model = build_model(tiny_config(bert_dir, bert_freeze_layers=2))
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith(BERT_PREFIX))
    assert len(param_groups(model, 1e-4, 2e-5, 0.01)) == 2  # no BERT group left
    with pytest.raises(ConfigError, match=r"model.bert_freeze_layers: 3 is outside 0..2"):
        build_model(tiny_config(bert_dir, bert_freeze_layers=3))
    with pytest.raises(ConfigError, match="must be >= 0"):
        tiny_config(bert_dir, bert_freeze_layers=-1)


# ------------------------------------------------------------------ gradient checkpointing

def test_gradient_checkpointing_recomputes_layers_and_matches_plain_gradients(bert_dir, batch):
    plain = BertTextEncoder(16, str(bert_dir))
    ckpt = BertTextEncoder(16, str(bert_dir), grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    calls = {"plain": 0, "ckpt": 0}

    def counter(key: str):
        def hook(*_: Any) -> None:
            calls[key] += 1
        return hook

    # a module inside the layer: the checkpoint wraps the layer's forward, so the recomputation
    # in backward runs it again (hooks on the layer itself stay outside the checkpoint)
    plain.bert.encoder.layer[0].intermediate.register_forward_hook(counter("plain"))
    ckpt.bert.encoder.layer[0].intermediate.register_forward_hook(counter("ckpt"))
    tb = batch["text_bert"]
    grads = {}
    for key, enc in (("plain", plain), ("ckpt", ckpt)):
        enc.train()  # dropout on: the recomputation must replay the same masks
        torch.manual_seed(123)
        h, _m = enc(tb)
        w = torch.linspace(-1.0, 1.0, h.shape[-1])
        (h * w).sum().backward()
        grads[key] = {n: p.grad.clone() for n, p in enc.named_parameters()}
    assert calls == {"plain": 1, "ckpt": 2}  # the checkpointed layer ran again in backward
    assert grads["plain"].keys() == grads["ckpt"].keys()
    for n, g in grads["plain"].items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(grads["ckpt"][n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_training_with_gradient_checkpointing_and_frozen_embeddings(bert_dir, batch):
    model = build_model(tiny_config(bert_dir, bert_grad_checkpointing=True, bert_freeze_layers=1))
    model.train()
    out = forward_batch(model, batch)
    out.pred.square().mean().backward()
    g = dict(model.named_parameters())["encoders.text.bert.encoder.layer.1.intermediate.dense.weight"].grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


# ------------------------------------------------------------------ the encoder itself

def test_encoder_mask_comes_from_text_bert_and_padding_does_not_leak(bert_dir):
    enc = BertTextEncoder(16, str(bert_dir)).eval()
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([7, 12, 3, 0])
    t = 12
    tb = torch.zeros(4, 3, t, dtype=torch.int64)
    real = torch.arange(t)[None] < lengths[:, None]
    tb[:, 0] = torch.where(real, torch.randint(1, VOCAB_SIZE, (4, t), generator=g), 0)
    tb[:, 1] = real.long()
    tb[:, 2] = torch.where(real & (torch.arange(t)[None] >= 2), 1, 0)
    with torch.no_grad():
        h, m = enc(tb)
        assert torch.equal(m, real)
        assert h.shape == (4, t, 16) and torch.isfinite(h).all()
        assert (h[~real] == 0).all() and (h[real].abs().sum(-1) > 0).all()
        # junk ids at padded positions and 5 more padding columns change nothing real
        tb2 = torch.cat([tb, torch.zeros(4, 3, 5, dtype=torch.int64)], dim=2)
        tb2[:, 0] = torch.where(tb2[:, 1] == 1, tb2[:, 0], torch.randint(1, VOCAB_SIZE, (4, t + 5), generator=g))
        h2, m2 = enc(tb2)
        torch.testing.assert_close(h2[:, :t][real], h[real], rtol=1e-5, atol=1e-6)
        assert (h2[:, t:] == 0).all() and not m2[:, t:].any()
        # reference: the same BERT run by hand on one sample of its true length
        i, n = 1, int(lengths[1])
        ref = enc.bert(input_ids=tb[i:i + 1, 0, :n], attention_mask=torch.ones(1, n, dtype=torch.long),
                       token_type_ids=tb[i:i + 1, 2, :n]).last_hidden_state
        torch.testing.assert_close(h[i, :n], enc.norm(enc.proj(ref))[0], rtol=1e-5, atol=1e-6)
        # a batch mask (token-level missing) removes tokens from BERT's attention too
        drop = real.clone()
        drop[1, 4] = False
        h3, m3 = enc(tb, drop)
        assert torch.equal(m3, drop) and (h3[1, 4] == 0).all()
        tb_short = tb[1:2, :, :n].clone()
        tb_short[0, 1, 4] = 0
        ref3 = enc(tb_short)[0][0]
        torch.testing.assert_close(h3[1, :n], ref3, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(h3[1, 5], h[1, 5], atol=1e-4)  # token 4 mattered to token 5


def test_encoder_refuses_tokens_this_bert_cannot_take(bert_dir):
    enc = BertTextEncoder(16, str(bert_dir))
    tb = torch.zeros(2, 3, 8, dtype=torch.int64)
    tb[:, 1] = 1
    tb[0, 0, 3] = VOCAB_SIZE
    with pytest.raises(DataError, match=f"token id {VOCAB_SIZE} is outside the BERT vocabulary"):
        enc(tb)
    with pytest.raises(DataError, match="max_position_embeddings"):
        enc(torch.zeros(1, 3, 65, dtype=torch.int64))
    with pytest.raises(DataError, match=r"expected \(B, 3, T\)"):
        enc(torch.zeros(2, 8, dtype=torch.int64))
    bad = torch.zeros(1, 3, 4, dtype=torch.int64)
    bad[0, 1] = 2
    with pytest.raises(DataError, match="attention mask"):
        enc(bad)


def test_model_needs_text_bert_and_checkpoint_rebuilds_without_the_directory(bert_dir, batch, tmp_path):
    own = save_tiny_bert(tmp_path / "own-bert", seed=3)
    torch.manual_seed(0)
    model = build_model(tiny_config(own)).eval()
    assert model.config.bert_config["hidden_size"] == 32
    with pytest.raises(AlignMambaError, match="no 'text_bert'"):
        model(batch["features"], batch["masks"])
    with torch.no_grad():
        want = forward_batch(model, batch).pred
        # the text features are not used at all: garbage there changes nothing
        feats = dict(batch["features"])
        feats["text"] = torch.randn_like(feats["text"])
        torch.testing.assert_close(model(feats, batch["masks"], text_bert=batch["text_bert"]).pred, want,
                                   rtol=0, atol=0)
    model.save_pretrained(tmp_path / "ckpt")
    shutil.rmtree(own)
    again = AlignMamba.from_pretrained(tmp_path / "ckpt").eval()
    assert again.config.bert_config == model.config.bert_config
    with torch.no_grad():
        torch.testing.assert_close(forward_batch(again, batch).pred, want, rtol=0, atol=0)


# ------------------------------------------------------------------ configuration errors

def test_config_validation(bert_dir, tmp_path):
    with pytest.raises(ConfigError, match="model.text_encoder: 'gpt' is not one of"):
        AlignMambaConfig(text_encoder="gpt")
    with pytest.raises(ConfigError, match="needs --bert-path DIR"):
        AlignMambaConfig(text_encoder="bert")
    with pytest.raises(ConfigError, match="model.bert_path: only used with model.text_encoder=bert"):
        AlignMambaConfig(bert_path=str(bert_dir))
    with pytest.raises(ConfigError, match="implemented for model 'alignmamba' only"):
        AlignMambaConfig(model="mamba_single", text_encoder="bert", bert_path=str(bert_dir))
    with pytest.raises(ConfigError, match="--bert-path .*nowhere: not a directory"):
        build_model(tiny_config(tmp_path / "nowhere"))
    (tmp_path / "roberta").mkdir()
    (tmp_path / "roberta" / "config.json").write_text('{"model_type": "roberta"}')
    with pytest.raises(ConfigError, match="model_type is 'roberta', expected 'bert'"):
        build_model(tiny_config(tmp_path / "roberta"))
    (tmp_path / "noweights").mkdir()
    shutil.copy(bert_dir / "config.json", tmp_path / "noweights" / "config.json")
    with pytest.raises(ConfigError, match="noweights: cannot load the BERT weights"):
        build_model(tiny_config(tmp_path / "noweights"))


def test_cli_bad_bert_path_is_one_line(data_file, tmp_path):
    rc, _out, err = cli("train", "--data", data_file, "--epochs", "1", "--out", tmp_path / "r",
                       "--text-encoder", "bert", "--bert-path", tmp_path / "missing", *TINY)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("alignmamba: error: --bert-path ") and "not a directory" in err


# ------------------------------------------------------------------ without transformers

@pytest.fixture
def no_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every ``import transformers[...]`` fail as if the package were not installed."""
    for name in list(sys.modules):
        if name == "transformers" or name.startswith("transformers."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import -> ImportError


def test_missing_transformers_gives_the_install_line(no_transformers, data_file, tmp_path):
    with pytest.raises(ImportError):
        import transformers  # noqa: F401  (the simulation works)
    rc, _out, err = cli("train", "--data", data_file, "--epochs", "1", "--out", tmp_path / "r",
                       "--text-encoder", "bert", "--bert-path", tmp_path, *TINY)
    assert rc == 2
    assert err == f"alignmamba: error: {INSTALL_HINT}\n"
    assert INSTALL_HINT == "--text-encoder bert needs the transformers package: pip install 'alignmamba[bert]'"
    with pytest.raises(AlignMambaError, match=r"pip install 'alignmamba\[bert\]'"):
        BertTextEncoder(16, str(tmp_path))


def test_default_path_works_without_transformers(no_transformers, data_file, batch, tmp_path):
    torch.manual_seed(0)
    cfg = AlignMambaConfig(input_dims={"text": 768, "audio": 5, "vision": 20}, d_model=16, n_layers=1, d_state=4)
    model = build_model(cfg)
    out = forward_batch(model, batch)
    out.pred.sum().add(out.align_loss).backward()
    assert model.encoders["text"].net[0].weight.grad.abs().sum() > 0
    model.save_pretrained(tmp_path / "ckpt")
    again = AlignMamba.from_pretrained(tmp_path / "ckpt")
    assert again.config.text_encoder == "features" and again.config.bert_config is None


def test_bert_checkpoint_without_transformers_is_one_line(bert_dir, tmp_path, monkeypatch):
    model = build_model(tiny_config(bert_dir))
    model.save_pretrained(tmp_path / "ckpt")
    for name in list(sys.modules):
        if name == "transformers" or name.startswith("transformers."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(CheckpointError, match=r"config.json: --text-encoder bert needs the transformers package"):
        AlignMamba.from_pretrained(tmp_path / "ckpt")
