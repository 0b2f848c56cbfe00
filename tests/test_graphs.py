"""The fast CUDA training step (alignmamba/graphs.py) and the sync-free training loop (train.py).

CPU: padding to the split's lengths is inert (loss and every gradient of the trimmed batch),
the device-resident split batches in the sampler's order, the loop's per-epoch sums equal a
plain per-step computation, and train.cuda_graphs on CPU warns once and trains eagerly.
CUDA only (skipped elsewhere): a graphed step equals the eager step from the same weights.
"""
from __future__ import annotations

import csv
import math
import warnings

import numpy as np
import pytest
import torch

from alignmamba import distributed as D
from alignmamba import graphs as G
from alignmamba import train as T
from alignmamba.data import load_mmsa
from alignmamba.data.dataset import SplitDataset, collate
from alignmamba.data.synthetic import make_synthetic
from alignmamba.errors import ConfigError
from alignmamba.model import AlignMambaConfig, build_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def ds():
    # MOSI's unaligned shapes (50x768 / 375x5 / 500x20), few samples
    raw = make_synthetic(like="mosi", seed=3, n_train=40, n_valid=12, n_test=8)
    return load_mmsa(raw, "synthetic:mosi", inplace=True)


def _mcfg(ds, **kw) -> AlignMambaConfig:
    base = {"input_dims": dict(ds.input_dims), "d_model": 16, "n_layers": 1, "d_state": 4, "dropout": 0.0}
    base.update(kw)
    return AlignMambaConfig(**base)


def _loss_and_grads(model, batch, mcfg):
    model.zero_grad(set_to_none=True)
    out = T.forward_batch(model, batch)
    loss = T.task_loss(out.pred, batch["label"], mcfg, "l1") + out.align_loss.float()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_grads_close(ga, gb):
    assert ga.keys() == gb.keys() and len(ga) > 10
    for name in ga:
        # fp32: the two batches reorder sums (longer scans and reductions), nothing else
        scale = float(gb[name].abs().max())
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-5, atol=1e-6 * max(scale, 1e-3),
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("kw", [
    {},
    {"encoder": "conv", "pooling": "last"},
    {"use_ot": False, "pooling": "max", "ot_time_beta": 0.5},
    {"task": "classification", "num_classes": 3, "mmd_bandwidth": "multi"},
])
def test_padded_batch_gives_the_trimmed_loss_and_gradients(ds, kw):
    torch.manual_seed(0)
    mcfg = _mcfg(ds, **kw)
    model = build_model(mcfg)
    model.train()  # dropout 0: train-mode paths without randomness
    split = ds.splits["train"]
    sds = SplitDataset(split, task=mcfg.task, num_classes=mcfg.num_classes)
    lengths = G.split_max_lengths(split)
    # samples shorter than the split's longest in every modality, so that padding is added
    short = [i for i in range(len(split)) if all(split.lengths[m][i] < lengths[m] for m in lengths)]
    trimmed = collate([sds[i] for i in short[:6]])
    padded = G.pad_batch(trimmed, lengths)
    # the test means something only if padding was actually added to every modality
    for m in split.modalities:
        assert padded["features"][m].shape[1] == lengths[m] > trimmed["features"][m].shape[1]
        assert float(trimmed["features"][m].abs().sum()) > 0
    la, ga = _loss_and_grads(model, padded, mcfg)
    lb, gb = _loss_and_grads(model, trimmed, mcfg)
    assert torch.isfinite(lb) and float(lb) > 0
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=0.0)
    _assert_grads_close(ga, gb)


def test_training_on_padded_device_batches_follows_the_trimmed_trajectory(tmp_path):
    """Eight optimizer steps (two epochs) on DeviceSplit batches and on the loader's trimmed
    batches, same seed and order, dropout 0: the same losses in fp32."""
    cfg, ds = _tiny_cfg(tmp_path, "model.dropout=0.0")

    def run(padded: bool) -> list[float]:
        T.set_seed(1)
        mcfg = T.fit_model_config(cfg.model, ds)
        model = build_model(mcfg)
        loader, _, _ = T.make_loaders(cfg, ds, 1)
        opt = T.make_optimizer(model, cfg.optim)
        sched = T.make_scheduler(opt, cfg.optim, 2, len(loader))
        dsplit = G.DeviceSplit(ds.splits["train"], "cpu")
        step = G.StepLoss(model, mcfg.modalities, lambda p, y: T.task_loss(p, y, mcfg, "l1"))
        losses = []
        for epoch in (1, 2):
            D.set_epoch(loader, epoch)
            model.train()
            for b in (dsplit.batches(list(loader.sampler), 16) if padded else loader):
                lt, la = step(*step.flat(b))
                loss = lt + la
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
        return losses

    trimmed, padded = run(False), run(True)
    assert len(trimmed) == 8 and len(set(trimmed)) == 8
    np.testing.assert_allclose(padded, trimmed, rtol=1e-5, atol=0)


def test_pad_batch_refuses_to_shorten(ds):
    sds = SplitDataset(ds.splits["train"])
    batch = collate([sds[0], sds[1]])
    short = {m: x.shape[1] - 1 for m, x in batch["features"].items()}
    with pytest.raises(ConfigError, match="lengths\\['text'\\]"):
        G.pad_batch(batch, short)


def test_device_split_batches_are_the_loaders_batches_padded(ds):
    split = ds.splits["train"]
    sampler = D.train_sampler(len(split), seed=5)
    sampler.set_epoch(2)
    order = list(sampler)
    assert order != sorted(order)
    dsplit = G.DeviceSplit(split, "cpu", task="classification", num_classes=2)
    sds = SplitDataset(split, task="classification", num_classes=2)
    got = list(dsplit.batches(order, 16))
    assert [b["label"].shape[0] for b in got] == [16, 16, 8]  # 40 samples, last batch partial
    for k, b in enumerate(got):
        idx = order[16 * k:16 * (k + 1)]
        want = G.pad_batch(collate([sds[i] for i in idx]), dsplit.lengths)
        assert b["index"].tolist() == idx
        assert torch.equal(b["label"], want["label"]) and b["label"].dtype == torch.int64
        for m in split.modalities:
            assert torch.equal(b["features"][m], want["features"][m])
            assert torch.equal(b["masks"][m], want["masks"][m])
    with pytest.raises(ConfigError, match="batch_size"):
        next(dsplit.batches(order, 0))


def test_graphed_step_runs_eagerly_off_cuda(ds):
    torch.manual_seed(1)
    mcfg = _mcfg(ds)
    model = build_model(mcfg)
    model.train()
    dsplit = G.DeviceSplit(ds.splits["train"], "cpu")
    batch = dsplit.batch(torch.tensor([4, 9, 2, 30]))
    step = G.GraphedTrainStep(model, mcfg.modalities, lambda p, y: T.task_loss(p, y, mcfg, "l1"),
                              amp=True, batch_size=4)
    lt, la = step(batch)
    assert not step.captured and step.eager_steps == 1 and step.replays == 0
    (lt + la).backward()
    g_step = _grads(model)
    loss, g_ref = _loss_and_grads(model, batch, mcfg)
    assert float(la.detach()) > 0  # the MMD term is part of what is compared
    torch.testing.assert_close(lt + la, loss, rtol=0, atol=0)
    for n in g_ref:
        torch.testing.assert_close(g_step[n], g_ref[n], rtol=0, atol=0)


TINY = ["data.synthetic_n_train=52", "data.synthetic_n_valid=20", "data.synthetic_n_test=12",
        "model.d_model=16", "model.n_layers=1", "model.d_state=4", "data.batch_size=16",
        "data.eval_batch_size=8", "train.quiet=true", "train.patience=50",
        "train.device=cpu"]  # also on a GPU machine (the CUDA test below overrides it)


def _tiny_cfg(tmp_path, *extra: str):
    cfg = T.resolve_config("synthetic", overrides=[*TINY, f"train.out={tmp_path}", *extra])
    ds = T.load_experiment_data(cfg)
    return cfg, ds


def _read_log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_sync_free_loop_logs_the_per_step_sums(tmp_path):
    """The device-side epoch sums equal sum_k float(loss_k) * n_k computed step by step."""
    cfg, ds = _tiny_cfg(tmp_path, "train.epochs=2", "train.seeds=[7]")
    T.train_one_seed(cfg, ds, 7, tmp_path / "run", log=lambda *a: None)
    rows = _read_log(tmp_path / "run" / "log.csv")

    # a plain reference loop: the same seed and order, a host read of every step's losses
    seed, tc, oc = 7, cfg.train, cfg.optim
    T.set_seed(seed)
    mcfg = T.fit_model_config(cfg.model, ds)
    model = build_model(mcfg)
    train_loader, valid_loader, _ = T.make_loaders(cfg, ds, seed)
    opt = T.make_optimizer(model, oc)
    sched = T.make_scheduler(opt, oc, tc.epochs, len(train_loader))
    from alignmamba import train_state as ts
    for epoch, row in zip((1, 2), rows):
        ts.reseed_epoch(train_loader, seed, epoch)
        D.set_epoch(train_loader, epoch)
        model.train()
        s_loss = s_task = s_align = 0.0
        n_seen = 0
        for batch in train_loader:
            out = T.forward_batch(model, batch)
            lt = T.task_loss(out.pred, batch["label"], mcfg, tc.loss)
            la = out.align_loss.float()
            loss = lt + la
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip)
            opt.step()
            sched.step()
            n = batch["label"].shape[0]
            n_seen += n
            s_loss += float(loss) * n
            s_task += float(lt) * n
            s_align += float(la) * n
        assert n_seen == 52
        val = T.evaluate_model(model, valid_loader, mcfg, torch.device("cpu"), tc.loss)
        v_total = 0.0
        with torch.no_grad():
            for batch in valid_loader:
                v_total += float(T.task_loss(T.forward_batch(model, batch).pred, batch["label"], mcfg,
                                             tc.loss)) * batch["label"].shape[0]
        # csv holds repr(float): exact round trip
        assert float(row["train_loss"]) == s_loss / n_seen
        assert float(row["train_task_loss"]) == s_task / n_seen
        assert float(row["train_align_loss"]) == s_align / n_seen
        assert float(row["train_align_loss"]) > 0
        assert float(row["valid_loss"]) == val["loss"] == v_total / 20


def test_cuda_graphs_on_cpu_warns_once_and_trains_eagerly(tmp_path, monkeypatch):
    monkeypatch.setattr(G, "_warned", set())
    cfg_eager, ds = _tiny_cfg(tmp_path / "e", "train.epochs=1")
    cfg_g, _ = _tiny_cfg(tmp_path / "g", "train.epochs=1", "train.cuda_graphs=true")
    assert cfg_g.train.cuda_graphs and not T.TrainConfig().cuda_graphs  # documented default: off
    ref = T.train_one_seed(cfg_eager, ds, 1111, tmp_path / "e", log=lambda *a: None)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for s in (1111, 1112):  # two seeds, one warning
            got = T.train_one_seed(cfg_g, ds, s, tmp_path / f"g{s}", log=lambda *a: None)
            if s == 1111:
                res = got
    msgs = [str(w.message) for w in rec if "train.cuda_graphs" in str(w.message)]
    assert len(msgs) == 1 and "CUDA graphs need a CUDA device" in msgs[0], msgs
    assert res["test"] == ref["test"] and res["valid_loss"] == ref["valid_loss"]
    a, b = _read_log(tmp_path / "e" / "log.csv"), _read_log(tmp_path / "g1111" / "log.csv")
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]


def test_unsupported_reasons():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert "CUDA device" in G.graphs_unsupported_reason(cpu)
    if torch.cuda.is_available():
        assert G.graphs_unsupported_reason(gpu) is None
        assert "DDP" in G.graphs_unsupported_reason(gpu, world=2)
        assert "missing" in G.graphs_unsupported_reason(gpu, missing=True)
        assert "BERT" in G.graphs_unsupported_reason(gpu, bert=True)


def test_progress_reads_the_loss_only_every_few_steps():
    class Counting:
        reads = 0

        def __float__(self):
            Counting.reads += 1
            return 0.5

    p = T.Progress(45, "x", enabled=True, every=20)
    p.enabled = True  # whether or not pytest's stderr is a terminal
    for _ in range(45):
        p.update(Counting())
    p.close()
    assert Counting.reads == 4  # steps 1, 20, 40 and the last
    assert not math.isnan(p.loss)


# ------------------------------------------------------------------ CUDA only

def _cuda_setup(ds, **kw):
    torch.manual_seed(0)
    mcfg = _mcfg(ds, **kw)  # dropout 0: graph and eager draw no random numbers
    model = build_model(mcfg).cuda().train()
    dsplit = G.DeviceSplit(ds.splits["train"], "cuda")
    loss_fn = lambda p, y: T.task_loss(p, y, mcfg, "l1")
    return mcfg, model, dsplit, loss_fn


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@cuda
def test_graphed_step_equals_eager_step_on_cuda(ds):
    # without OT: its scatter-add (eq. 6) adds with CUDA atomics in the forward, so two runs
    # of the same step differ in the last bits everywhere downstream (H100: 2 of 3 runs with
    # OT had single elements off by up to 4x the fp32 tolerance). The resampling used instead
    # has atomics only in its backward (gather's), a few terms each: 5 of 5 runs passed.
    # OT under graphs: the amp test below.
    mcfg, model, dsplit, loss_fn = _cuda_setup(ds, use_ot=False)
    eager = G.StepLoss(model, mcfg.modalities, loss_fn, amp=False)
    step = G.GraphedTrainStep(model, mcfg.modalities, loss_fn, amp=False, batch_size=8)
    gen = torch.Generator().manual_seed(0)
    for k in range(3):  # capture, then replays with new data in the static inputs
        idx = torch.randperm(40, generator=gen)[:8].cuda()
        batch = dsplit.batch(idx)
        model.zero_grad(set_to_none=True)
        lt_e, la_e = eager(*eager.flat(batch))
        (lt_e + la_e).backward()
        # drop the eager step's autograd graph before the capture: alive, it keeps the
        # parameters' AccumulateGrad nodes of the default stream, which the backward capture
        # cannot join (cudaErrorStreamCaptureImplicit; GraphedTrainStep.capture)
        lt_e, la_e = lt_e.detach(), la_e.detach()
        g_e = _grads(model)
        model.zero_grad(set_to_none=True)
        lt_g, la_g = step(batch)
        (lt_g + la_g).backward()
        g_g = _grads(model)
        assert step.captured and step.replays == k + 1
        torch.testing.assert_close(lt_g, lt_e, rtol=1e-5, atol=0)
        torch.testing.assert_close(la_g, la_e, rtol=1e-5, atol=1e-7)
        _assert_grads_close(g_g, g_e)
    # another shape runs eagerly on the same parameters
    lt, la = step(dsplit.batch(torch.arange(5, device="cuda")))
    assert step.eager_steps == 1 and step.replays == 3 and torch.isfinite(lt + la)


@cuda
def test_graphed_step_with_amp_is_close_to_eager_amp(ds):
    mcfg, model, dsplit, loss_fn = _cuda_setup(ds)
    eager = G.StepLoss(model, mcfg.modalities, loss_fn, amp=True)
    step = G.GraphedTrainStep(model, mcfg.modalities, loss_fn, amp=True, batch_size=8)
    batch = dsplit.batch(torch.arange(8, device="cuda"))
    step(batch)
    lt_g, la_g = step(batch)
    lt_e, la_e = eager(*eager.flat(batch))
    # the same bf16 kernels on the same inputs; fp32 atomics (OT scatter-add) may round
    # differently, and bf16 keeps 8 significant bits: one flipped rounding moves a value ~0.4%
    torch.testing.assert_close(lt_g + la_g, lt_e + la_e, rtol=2e-2, atol=0)


@cuda
def test_train_with_cuda_graphs_replays_and_matches_eager(tmp_path, monkeypatch):
    calls = {"replay": 0, "eager": 0}
    real = G.GraphedTrainStep.__call__

    def spy(self, batch):
        before = self.replays
        out = real(self, batch)
        calls["replay" if self.replays > before else "eager"] += 1
        return out

    monkeypatch.setattr(G.GraphedTrainStep, "__call__", spy)
    common = ["train.epochs=2", "model.dropout=0.0", "train.amp=false"]
    cfg_g, ds = _tiny_cfg(tmp_path / "g", *common, "train.cuda_graphs=true", "train.device=cuda")
    cfg_e, _ = _tiny_cfg(tmp_path / "e", *common, "train.device=cuda")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        T.train_one_seed(cfg_g, ds, 1111, tmp_path / "g", log=lambda *a: None)
    assert not [w for w in rec if "train.cuda_graphs" in str(w.message)]  # no fallback on CUDA
    assert calls == {"replay": 2 * 3, "eager": 2 * 1}  # 52 samples: 3 full batches of 16 + 4
    T.train_one_seed(cfg_e, ds, 1111, tmp_path / "e", log=lambda *a: None)
    g, e = _read_log(tmp_path / "g" / "log.csv"), _read_log(tmp_path / "e" / "log.csv")
    # padded vs trimmed batches, fused vs foreach AdamW: rounding only, over 8 steps
    for rg, re_ in zip(g, e):
        assert np.isclose(float(rg["train_loss"]), float(re_["train_loss"]), rtol=1e-4, atol=0)
        assert np.isclose(float(rg["valid_loss"]), float(re_["valid_loss"]), rtol=1e-4, atol=0)


# ------------------------------------------------------------------ GraphedForward (inference)

def _infer_inputs(device, lengths=(7, 30, 41), seed=0):
    g = torch.Generator().manual_seed(seed)
    dims = {"text": 12, "audio": 5, "vision": 7}
    feats = {m: torch.randn(2, n, dims[m], generator=g).to(device) for m, n in zip(dims, lengths)}
    masks = {m: torch.ones(2, n, dtype=torch.bool, device=device) for m, n in zip(dims, lengths)}
    masks["audio"][1, lengths[1] // 2:] = False  # padding in one sample
    return feats, masks


def _infer_model(device):
    torch.manual_seed(0)
    cfg = AlignMambaConfig(input_dims={"text": 12, "audio": 5, "vision": 7}, d_model=16,
                           n_layers=2, d_state=4, dropout=0.0)
    return build_model(cfg).to(device).eval()


def test_graphed_forward_off_cuda_runs_eagerly_and_warns_once():
    model = _infer_model("cpu")
    feats, masks = _infer_inputs("cpu")
    msg = "GraphedForward: CUDA graphs need a CUDA device; running eagerly"
    G._warned.discard(msg)
    g = G.GraphedForward(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [g(feats, masks).pred, g(feats, masks).pred]
    assert [str(w.message) for w in caught].count(msg) == 1
    with torch.inference_mode():
        ref = model(feats, masks).pred
    for out in outs:
        assert torch.equal(out, ref)
    assert (g.eager_calls, g.replays) == (2, 0)


def test_graphed_forward_refuses_training_mode_and_bad_settings():
    model = _infer_model("cpu").train()
    feats, masks = _infer_inputs("cpu")
    with pytest.raises(RuntimeError, match="training mode"):
        G.GraphedForward(model)(feats, masks)
    with pytest.raises(ValueError, match="max_graphs=0"):
        G.GraphedForward(model, max_graphs=0)


@cuda
def test_graphed_forward_replays_equal_eager_on_cuda():
    model = _infer_model("cuda")
    g = G.GraphedForward(model, amp=False, max_graphs=1)  # fp32: replay and eager run the same kernels

    def eager(f, m):
        with torch.inference_mode():
            return model(f, m).pred.clone()

    a, b = _infer_inputs("cuda", seed=1), _infer_inputs("cuda", seed=2)
    pa = g(*a).pred.clone()
    pb = g(*b).pred.clone()  # same shapes: a replay, new values
    assert g.replays == 2 and g.eager_calls == 0 and not torch.equal(pa, pb)
    # OT's scatter-add sums with atomics (no fixed order): fp32 rounding apart, nothing more
    torch.testing.assert_close(pa, eager(*a), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pb, eager(*b), rtol=1e-5, atol=1e-6)
    c = _infer_inputs("cuda", lengths=(9, 20, 33), seed=3)
    torch.testing.assert_close(g(*c).pred, eager(*c), rtol=1e-5, atol=1e-6)
    assert len([v for v in g._graphs.values() if v is not None]) == 1  # the first was dropped
    torch.testing.assert_close(g(*a).pred, eager(*a), rtol=1e-5, atol=1e-6)  # captured again
    assert g.replays == 4


def test_capture_failure_is_one_line():
    """The warning text of a failed capture: type and first message line, also for an
    exception without a message (which used to raise IndexError inside the handler)."""
    assert G.capture_failure(RuntimeError("operation not permitted when stream is capturing\n"
                                          "more")) == ("CUDA graph capture failed (RuntimeError: "
                                                       "operation not permitted when stream is "
                                                       "capturing)")
    assert G.capture_failure(AssertionError()) == "CUDA graph capture failed (AssertionError)"
    long = G.capture_failure(ValueError("x" * 500))
    assert "\n" not in long and long.count("x") == 120
