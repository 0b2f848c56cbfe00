"""Evaluate a saved checkpoint on a data file, and draw its transport plans (paper Figure 5)."""
from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    read_checkpoint_config,
)
from .config import from_dict
from .errors import AlignMambaError, DataError


def load_for_checkpoint(checkpoint: str, data: str | None, device: str = "auto"):
    """(model, model config, experiment config, dataset) with the data checked against the model."""
    from .train import ExperimentConfig, load_experiment_data, pick_device

    meta = read_checkpoint_config(checkpoint)
    dev = pick_device(device)
    model = load_checkpoint(checkpoint, dev)
    mcfg = model.config
    exp_dict = meta.get("experiment")
    try:
        exp = from_dict(ExperimentConfig, exp_dict, "experiment") if isinstance(exp_dict, dict) else ExperimentConfig()
    except AlignMambaError:
        exp = ExperimentConfig()
    exp.model = mcfg
    exp.train.device = device
    if data:
        exp.data.path = data
    elif not exp.data.path and exp.data.dataset != "synthetic":
        raise DataError(f"{checkpoint}: the checkpoint was not trained on generated data; give --data FILE")
    ds = load_experiment_data(exp)
    check_data_fits(ds, mcfg, data or exp.data.path or "synthetic data")
    return model, mcfg, exp, ds, dev


def check_data_fits(ds, mcfg, where: str) -> None:
    """Refuse data whose modalities or feature widths differ from the model's (one line)."""
    for m in mcfg.modalities:
        if m not in ds.input_dims:
            raise DataError(f"{where}: modality '{m}' of the checkpoint is not in the data")
        if int(ds.input_dims[m]) != int(mcfg.input_dims[m]):
            raise DataError(f"{where}: {m} feature width {ds.input_dims[m]} does not match the checkpoint's "
                            f"{mcfg.input_dims[m]}")


def evaluate_checkpoint(a: argparse.Namespace) -> dict[str, Any]:
    """``alignmamba evaluate``: under the checkpoint's ``train.deterministic`` setting, so that a
    deterministic run's checkpoint evaluates to the same bits on CUDA as well."""
    from .train import deterministic_mode

    model, mcfg, exp, ds, dev = load_for_checkpoint(a.checkpoint, a.data, a.device)
    with deterministic_mode(exp.train.deterministic):
        return _evaluate(a, model, mcfg, exp, ds, dev)


def _evaluate(a: argparse.Namespace, model, mcfg, exp, ds, dev) -> dict[str, Any]:
    from .data import make_loader
    from .train import evaluate_model, format_table

    if a.split not in ds.splits:
        raise DataError(f"{ds.source}: no split '{a.split}'")
    if getattr(a, "missing_rates", None):
        from .missing import evaluate_over_rates
        return evaluate_over_rates(model, mcfg, exp, ds, dev, a)
    loader = make_loader(ds.splits[a.split], exp.data.eval_batch_size, shuffle=False, seed=0,
                         task=mcfg.task, num_classes=mcfg.num_classes)
    res = evaluate_model(model, loader, mcfg, dev, exp.train.loss, exp.train.amp and dev.type == "cuda")
    out = {"checkpoint": str(a.checkpoint), "data": ds.source, "split": a.split, "loss": res["loss"],
           **res["metrics"]}
    print(format_table(res["metrics"], {k: 0.0 for k in res["metrics"]}, f"{a.split} metric"))
    if a.json:
        atomic_write_json(a.json, out)
    return out


def plot_plan(a: argparse.Namespace) -> None:
    """Heatmaps of the source->anchor transport plans of one sample, words on the anchor axis."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AlignMambaError("plot-plan needs matplotlib: pip install matplotlib") from None
    from .data.dataset import SplitDataset, collate
    from .train import _uses_bert, forward_batch

    model, mcfg, _exp, ds, _dev = load_for_checkpoint(a.checkpoint, a.data, "cpu")
    if mcfg.model != "alignmamba":
        raise AlignMambaError(f"--checkpoint: model '{mcfg.model}' has no transport plan")
    split = ds.splits.get(a.split)
    if split is None:
        raise DataError(f"{ds.source}: no split '{a.split}'")
    n = len(split.labels)
    if not 0 <= a.index < n:
        raise AlignMambaError(f"--index: {a.index} is outside the split '{a.split}' (0..{n - 1})")
    batch = collate([SplitDataset(split, task=mcfg.task, num_classes=mcfg.num_classes)[a.index]])
    model.eval()
    with torch.no_grad():
        out = forward_batch(model, batch, return_plans=True)  # passes text_bert to a BERT model
    if not out.plans:
        raise AlignMambaError("--checkpoint: this model was trained without OT alignment (use_ot=false)")

    def n_valid(m: str) -> int:
        """Valid tokens of sample 0 for modality m, as the model counts them."""
        mk = batch["masks"][m][0]
        if m == "text" and _uses_bert(model):  # BERT text: the attention row of text_bert as well
            mk = mk & (batch["text_bert"][0, 1] != 0)
        return int(mk.sum())

    n_anchor = n_valid(mcfg.anchor)
    words = None
    if split.raw_text is not None:
        toks = str(split.raw_text[a.index]).split()
        # BERT-style sequences carry [CLS] ... [SEP] around the words
        if len(toks) + 2 == n_anchor:
            toks = ["[CLS]"] + toks + ["[SEP]"]
        if len(toks) == n_anchor:
            words = toks
    fig, axes = plt.subplots(len(out.plans), 1, figsize=(max(6, n_anchor * 0.28), 3.2 * len(out.plans)),
                             squeeze=False)
    for ax, (m, plan) in zip(axes[:, 0], out.plans.items()):
        n_src = n_valid(m)
        p = plan[0, :n_src, :n_anchor].T.numpy()
        im = ax.imshow(p, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(f"{m} -> {mcfg.anchor} transport plan (sample {a.index}, label {float(split.labels[a.index]):+.2f})")
        ax.set_xlabel(f"{m} frame")
        ax.set_ylabel(mcfg.anchor)
        if words:
            ax.set_yticks(range(n_anchor))
            ax.set_yticklabels(words, fontsize=6)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(a.out), buf.getvalue())
    print(f"wrote {a.out}")
