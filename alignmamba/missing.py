"""Missing modalities (the incomplete setting, SPEC.md section 4): masks, training, evaluation.

Two protocols, selected by name:

``"imder"``  whole modalities are dropped per sample (the protocol of IMDer / MMIN that the
             paper's table follows). At missing rate r a share ``p_two(r)`` of the samples keeps
             a single modality and a share ``p_one(r)`` loses exactly one; which modality
             remains (or goes) is uniform at random; at least one modality is always present.
             Result: ``present`` (N, M) bool, True = modality available.
``"tokens"`` MMSA's ``data_missing`` style: in every modality a random fraction r of each
             sample's real frames / tokens is masked out (mask False, features zeroed); at
             least one real token per modality is kept.

Masks for evaluation are a pure function of (seed, rate, sample index) and of nothing
else (not of the batch order, the batch size or the model), so two runs and two models see
the same missing pattern. For one seed the same uniform numbers are used at every rate
(common random numbers): the set of samples that lose modalities only grows with the rate,
so a curve over rates compares like with like. See docs/MISSING.md.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import AlignMambaError, ConfigError

if TYPE_CHECKING:  # annotations only; importing train/data here would be circular
    import argparse

    from .data.dataset import MultimodalDataset, MultimodalSplit
    from .model import AlignMambaConfig
    from .train import ExperimentConfig

__all__ = [
    "IMDER_TABLE",
    "PROTOCOLS",
    "TrainingMissingSampler",
    "apply_missing",
    "evaluate_over_rates",
    "evaluation_masks",
    "format_rates_table",
    "imder_shares",
    "parse_rates",
    "plot_missing_curves",
    "sample_modality_mask",
    "sample_token_mask",
    "summarize_rates",
]

PROTOCOLS: tuple[str, ...] = ("imder", "tokens")

# SPEC.md section 4: missing rate -> (share of samples with two of three modalities missing,
# share with one missing). The rest is complete.
IMDER_TABLE: dict[float, tuple[float, float]] = {
    0.1: (0.1, 0.1),
    0.2: (0.2, 0.2),
    0.3: (0.3, 0.3),
    0.4: (0.5, 0.2),
    0.5: (0.7, 0.1),
    0.6: (0.9, 0.0),
    0.7: (1.0, 0.0),
}
# Piecewise-linear knots: rate 0 is the complete setting; beyond 0.7 the table is saturated
# (every sample already keeps a single modality), so the last row is held.
_KNOTS_R = np.array([0.0] + sorted(IMDER_TABLE))
_KNOTS_TWO = np.array([0.0] + [IMDER_TABLE[r][0] for r in sorted(IMDER_TABLE)])
_KNOTS_ONE = np.array([0.0] + [IMDER_TABLE[r][1] for r in sorted(IMDER_TABLE)])

# Training draws a rate per batch from this range when ``rate < 0`` (the paper's range).
RANDOM_RATE_RANGE: tuple[float, float] = (0.1, 0.7)

# Stream tags mixed into the seeds so the protocols and purposes never share random numbers.
_TAG_IMDER, _TAG_TOKENS, _TAG_TRAIN = 0x1D3E, 0x70C5, 0x7EA1

_PLOT_METRICS_REGRESSION = ("Has0_acc_2", "Non0_acc_2")
_PLOT_METRICS_CLASSIFICATION = ("Acc",)


# ------------------------------------------------------------------ validation helpers


def _check_rate(rate: float, where: str, allow_negative: bool = False) -> float:
    try:
        r = float(rate)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: missing rate must be a number, got {rate!r}") from None
    if not math.isfinite(r) or r > 1.0 or (r < 0.0 and not allow_negative):
        lo = "a negative value (random per batch) or " if allow_negative else ""
        raise ConfigError(f"{where}: missing rate must be {lo}in [0, 1], got {rate!r}")
    return r


def _check_protocol(protocol: str, where: str) -> str:
    if protocol not in PROTOCOLS:
        raise ConfigError(
            f"{where}: unknown missing-modality protocol {protocol!r} "
            f"(known: {', '.join(PROTOCOLS)})"
        )
    return protocol


def _check_modalities(modalities: Sequence[str], where: str) -> list[str]:
    mods = list(modalities)
    if not mods or len(set(mods)) != len(mods):
        raise ConfigError(f"{where}: need one or more distinct modality names, got {mods}")
    return mods


def _rng(*keys: int) -> np.random.Generator:
    # SeedSequence mixes every key into the state: (seed, tag, modality) -> an independent stream.
    return np.random.default_rng(np.random.SeedSequence([int(k) % (2**63) for k in keys]))


# ------------------------------------------------------------------ IMDer (whole modalities)


def imder_shares(missing_rate: float) -> tuple[float, float]:
    """(share with two of three modalities missing, share with one missing) at ``missing_rate``.

    Exact at the SPEC.md section 4 table rates 0.1..0.7; linear interpolation between them
    and between rate 0 (complete, (0, 0)) and 0.1; held at (1, 0) above 0.7.
    """
    r = _check_rate(missing_rate, "missing_rate")
    return float(np.interp(r, _KNOTS_R, _KNOTS_TWO)), float(np.interp(r, _KNOTS_R, _KNOTS_ONE))


def _imder_from_uniforms(u: np.ndarray, missing_rate: float, n_mod: int) -> np.ndarray:
    """u: (N, 3) uniforms in [0, 1) -> present (N, n_mod) bool.

    Column 0 picks the case (keep one / lose one / complete), column 1 which modality is
    kept, column 2 which one is lost. Reusing the same u at every rate nests the patterns.
    """
    p_two, p_one = imder_shares(missing_rate)
    n = u.shape[0]
    present = np.ones((n, n_mod), dtype=bool)
    if n_mod < 2:  # a single modality can never be dropped (at least one stays)
        return present
    keep_only = u[:, 0] < p_two
    lose_one = ~keep_only & (u[:, 0] < p_two + p_one)
    kept = np.minimum((u[:, 1] * n_mod).astype(np.int64), n_mod - 1)
    lost = np.minimum((u[:, 2] * n_mod).astype(np.int64), n_mod - 1)
    cols = np.arange(n_mod)[None, :]
    present[keep_only] = cols == kept[keep_only, None]
    present[lose_one] = cols != lost[lose_one, None]
    return present


def sample_modality_mask(
    num_samples: int,
    missing_rate: float,
    modalities: Sequence[str] = ("text", "audio", "vision"),
    seed: int = 0,
) -> np.ndarray:
    """IMDer protocol (SPEC.md section 4): ``present`` (num_samples, M) bool, True = available.

    Each sample independently: with probability ``p_two(r)`` only one modality remains
    (uniformly chosen), with probability ``p_one(r)`` exactly one is missing (uniformly
    chosen), otherwise it is complete (see :func:`imder_shares`). For M = 3 this is the
    table; for other M "two missing" reads "all but one missing" (for M = 2 both cases drop
    one modality). At least one modality is always present.

    Deterministic for ``seed``; row i depends only on (seed, i, rate), so the first k rows
    do not change with ``num_samples`` and a split's masks can be indexed by sample index.
    """
    if (
        not isinstance(num_samples, (int, np.integer))
        or isinstance(num_samples, bool)
        or num_samples < 0
    ):
        raise ConfigError(f"num_samples: must be a non-negative integer, got {num_samples!r}")
    mods = _check_modalities(modalities, "modalities")
    # rng.random fills row-major from one sequential stream: row i is the same for any N.
    u = _rng(seed, _TAG_IMDER).random((int(num_samples), 3))
    return _imder_from_uniforms(u, missing_rate, len(mods))


# ------------------------------------------------------------------ token level (MMSA data_missing)


def _drop_tokens(
    real: np.ndarray, missing_rate: float, prio: np.ndarray, frac: np.ndarray
) -> np.ndarray:
    """real: (N, T) bool; prio: (N, T) and frac: (N,) uniforms -> kept (N, T) bool, kept <= real.

    Sample i loses k_i = floor(r L_i + frac_i) of its L_i real tokens (stochastic rounding:
    E[k_i] = r L_i exactly), capped at L_i - 1 so one real token stays; the lost ones are
    those with the lowest ``prio``. The same ``prio`` at every rate nests the patterns.
    """
    n, t = real.shape
    if n == 0 or t == 0:
        return real.copy()
    length = real.sum(1)
    k = np.floor(missing_rate * length + frac).astype(np.int64)
    k = np.clip(k, 0, np.maximum(length - 1, 0))
    key = np.where(real, prio, np.inf)  # padding sorts last, never dropped before real tokens
    order = np.argsort(key, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(t), (n, t)), axis=1)
    return real & (rank >= k[:, None])


def sample_token_mask(
    real_mask: np.ndarray, missing_rate: float, seed: int = 0, stream: int = 0
) -> np.ndarray:
    """Token protocol for one modality: (N, T) bool real-token mask -> (N, T) kept mask.

    A random fraction ``missing_rate`` of each row's real tokens is set False (the count is
    rounded stochastically, so the expected fraction is exact), keeping at least one real
    token per row. Deterministic for (seed, stream); row i depends only on (seed, stream,
    i, T, rate). Use a different ``stream`` per modality.
    """
    real = np.asarray(real_mask, dtype=bool)
    if real.ndim != 2:
        raise ConfigError(f"real_mask: must be (N, T) bool, got shape {real.shape}")
    r = _check_rate(missing_rate, "missing_rate")
    n, t = real.shape
    u = _rng(seed, _TAG_TOKENS, stream).random((n, t + 1))
    return _drop_tokens(real, r, u[:, :t], u[:, t])


# ------------------------------------------------------------------ applying masks to a batch


def apply_missing(
    batch: Mapping[str, Any],
    modalities: Sequence[str],
    present: torch.Tensor | None = None,
    kept: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Return a copy of ``batch`` with modalities / tokens removed (the input is not modified).

    present: (B, M) bool in ``modalities`` order; combined (AND) with any ``batch["present"]``.
      The features of an absent modality are also zeroed, so no model can read them even if
      it ignored ``present``; its mask is left alone (AlignMamba keeps an absent anchor's
      time grid, see model.py).
    kept: {m: (B, T_m) bool}: tokens to keep; the batch mask becomes mask & kept and the
      features at dropped tokens are zeroed.
    """
    out = dict(batch)
    feats = dict(batch["features"])
    masks = dict(batch["masks"])
    if present is not None:
        present = present.to(torch.bool)
        if "present" in batch and batch["present"] is not None:
            present = present & batch["present"].to(torch.bool)
        out["present"] = present
        for i, m in enumerate(modalities):
            col = present[:, i]
            if not bool(col.all()):
                feats[m] = feats[m] * col[:, None, None].to(feats[m].dtype)
    if kept is not None:
        for m, k in kept.items():
            k = k.to(torch.bool)
            masks[m] = masks[m] & k
            feats[m] = feats[m] * k[..., None].to(feats[m].dtype)
    out["features"], out["masks"] = feats, masks
    return out


class TrainingMissingSampler:
    """Training-time augmentation: ``sampler(batch) -> batch`` with modalities or tokens missing.

    protocol: "imder" (adds ``present`` (B, M)) or "tokens" (masks out frames/tokens).
    rate: missing rate in [0, 1]; negative draws a rate uniformly in [0.1, 0.7] per batch.
    modalities: the model's ``cfg.modalities`` (the column order of ``present``).
    seed: the sequence of masks is reproducible for a seed (one generator, advanced per batch).
    """

    def __init__(self, protocol: str, rate: float, modalities: Sequence[str], seed: int = 0):
        self.protocol = _check_protocol(protocol, "data.missing_protocol")
        self.rate = _check_rate(rate, "data.missing_rate", allow_negative=True)
        self.modalities = _check_modalities(modalities, "model.modalities")
        self.rng = _rng(seed, _TAG_TRAIN)

    def draw_rate(self) -> float:
        """The rate for the next batch: the fixed rate, or uniform in [0.1, 0.7] when negative."""
        if self.rate >= 0:
            return self.rate
        lo, hi = RANDOM_RATE_RANGE
        return float(self.rng.uniform(lo, hi))

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """CPU batch dict (docs/ARCHITECTURE.md) -> a new batch dict with missing parts removed."""
        absent = [m for m in self.modalities if m not in batch["features"]]
        if absent:
            raise ConfigError(
                f"model.modalities: modality '{absent[0]}' is not in the training batch"
            )
        rate = self.draw_rate()
        b = int(batch["label"].shape[0])
        if self.protocol == "imder":
            present = _imder_from_uniforms(self.rng.random((b, 3)), rate, len(self.modalities))
            return apply_missing(batch, self.modalities, present=torch.from_numpy(present))
        kept = {}
        for m in self.modalities:
            real = batch["masks"][m].cpu().numpy().astype(bool)
            u = self.rng.random((real.shape[0], real.shape[1] + 1))
            kept[m] = torch.from_numpy(_drop_tokens(real, rate, u[:, :-1], u[:, -1]))
        return apply_missing(batch, self.modalities, kept=kept)


# ------------------------------------------------------------------ evaluation over rates


def evaluation_masks(
    split: MultimodalSplit,
    missing_rate: float,
    protocol: str,
    modalities: Sequence[str],
    seed: int = 0,
) -> dict[str, Any]:
    """Fixed masks for a whole split (indexed by the batches' ``index``).

    imder: {"present": (N, M) bool} in ``modalities`` order; tokens: {"kept": {m: (N, T_m) bool}}.
    Drawn in the data's canonical modality order (text, audio, vision), then reordered, so
    two models with different ``cfg.modalities`` orders still see the same pattern.
    """
    _check_protocol(protocol, "--missing-protocol")
    r = _check_rate(missing_rate, "--missing-rates")
    mods = _check_modalities(modalities, "model.modalities")
    canon = [m for m in split.modalities if m in mods] + [
        m for m in mods if m not in split.modalities
    ]
    n = len(split)
    if protocol == "imder":
        pres = sample_modality_mask(n, r, canon, seed)
        return {"present": pres[:, [canon.index(m) for m in mods]]}
    return {
        "kept": {m: sample_token_mask(split.mask(m), r, seed, stream=canon.index(m)) for m in mods}
    }


def _masked_batches(
    loader: Iterable, masks: Mapping[str, Any], modalities: Sequence[str]
) -> Iterator[dict]:
    for batch in loader:
        idx = batch["index"].numpy()
        if "present" in masks:
            yield apply_missing(batch, modalities, present=torch.from_numpy(masks["present"][idx]))
        else:
            # collate trims each modality to the batch's longest real length; kept <= real
            kept = {
                m: torch.from_numpy(k[idx][:, : batch["masks"][m].shape[1]])
                for m, k in masks["kept"].items()
            }
            yield apply_missing(batch, modalities, kept=kept)


def parse_rates(text: str | Sequence[float]) -> list[float]:
    """'0.1,0.2,0.3' -> [0.1, 0.2, 0.3]; each in [0, 1] and distinct, else a ConfigError
    naming --missing-rates."""
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    rates = []
    for p in parts:
        if p == "":
            continue
        try:
            r = float(p)
        except ValueError:
            raise ConfigError(
                f"--missing-rates: {p!r} is not a number (expected e.g. 0.1,0.2,0.3)"
            ) from None
        rates.append(_check_rate(r, "--missing-rates"))
    if not rates:
        raise ConfigError("--missing-rates: give at least one rate, e.g. 0.1,0.2,0.3")
    if len(set(rates)) != len(rates):
        raise ConfigError(f"--missing-rates: a rate is repeated in {text!r}")
    return rates


def summarize_rates(
    rows: Sequence[Mapping[str, float]],
) -> tuple[dict[str, float], dict[str, float]]:
    """(average over rates, drop from the lowest to the highest rate) of every metric.

    drop[k] = value at the lowest rate - value at the highest rate: positive when the metric
    falls (accuracy lost, as the paper's "drop"); for MAE, where lower is better, a loss of
    quality shows as a negative drop.
    """
    keys = [k for k in rows[0] if k != "missing_rate"]
    avg = {k: float(np.mean([row[k] for row in rows])) for k in keys}
    lo = min(rows, key=lambda row: row["missing_rate"])
    hi = max(rows, key=lambda row: row["missing_rate"])
    drop = {k: float(lo[k] - hi[k]) for k in keys}
    return avg, drop


def _is_pct(name: str) -> bool:
    return "acc" in name.lower() or "f1" in name.lower()


def format_rates_table(result: Mapping[str, Any]) -> str:
    """The rows of :func:`evaluate_over_rates`' result, the average and the drop, as text.

    Accuracies and F1 in percent (as the paper's tables), MAE and Corr as they are.
    """
    rows = result["rates"]
    keys = [k for k in rows[0] if k != "missing_rate"]
    head = f"{'rate':<8}" + "".join(f"{k:>15}" for k in keys)
    lines = [head]

    def fmt(label: str, row: Mapping[str, float]) -> str:
        return f"{label:<8}" + "".join(
            f"{100 * row[k]:>15.2f}" if _is_pct(k) else f"{row[k]:>15.4f}" for k in keys
        )

    for row in rows:
        lines.append(fmt(f"{row['missing_rate']:g}", row))
    lines.append(fmt("average", result["average"]))
    lines.append(fmt("drop", result["drop"]))
    return "\n".join(lines)


def evaluate_over_rates(
    model: torch.nn.Module,
    mcfg: AlignMambaConfig,
    exp: ExperimentConfig,
    ds: MultimodalDataset,
    dev: torch.device,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One evaluation per missing rate on ``args.split``; prints a table, writes JSON / PNG.

    args: missing_rates ("0.1,0.2,..."), missing_protocol ("imder" | "tokens"), missing_seed,
    json (path or None), plot (PNG path or None), split, checkpoint. Returns
    ``{"rates": [{"missing_rate": r, <metric>: value, ...}], "average": {...}, "drop": {...},
    "protocol", "missing_seed", "split", "checkpoint", "data"}``. The masks depend only on
    (missing_seed, rate, sample index) (:func:`evaluation_masks`).
    """
    from .data import make_loader
    from .train import evaluate_model

    rates = parse_rates(args.missing_rates)
    protocol = _check_protocol(
        getattr(args, "missing_protocol", None) or "imder", "--missing-protocol"
    )
    seed = int(getattr(args, "missing_seed", 0) or 0)
    split = ds.splits[args.split]
    mods = list(mcfg.modalities)
    loader = make_loader(
        split,
        exp.data.eval_batch_size,
        shuffle=False,
        seed=0,
        task=mcfg.task,
        num_classes=mcfg.num_classes,
    )
    amp = bool(exp.train.amp) and dev.type == "cuda"
    rows = []
    for r in rates:
        masks = evaluation_masks(split, r, protocol, mods, seed)
        res = evaluate_model(
            model, _masked_batches(loader, masks, mods), mcfg, dev, exp.train.loss, amp
        )
        rows.append({"missing_rate": r, **res["metrics"]})
    avg, drop = summarize_rates(rows)
    result: dict[str, Any] = {
        "rates": rows,
        "average": avg,
        "drop": drop,
        "protocol": protocol,
        "missing_seed": seed,
        "split": args.split,
        "checkpoint": str(getattr(args, "checkpoint", "")),
        "data": ds.source,
    }
    print(f"{args.split} split, protocol {protocol}, missing seed {seed} ({ds.source})")
    print(format_rates_table(result))
    if getattr(args, "json", None):
        from .checkpoint import atomic_write_json

        atomic_write_json(args.json, result)
    if getattr(args, "plot", None):
        plot_missing_curves(
            {str(getattr(args, "checkpoint", "") or "model"): result},
            args.plot,
            title=f"{protocol} protocol, {args.split} split, missing seed {seed}",
        )
        print(f"wrote {args.plot}")
    return result


def plot_missing_curves(
    curves: Mapping[str, Mapping[str, Any]],
    path: str | Path,
    metrics: Sequence[str] | None = None,
    title: str | None = None,
) -> None:
    """PNG of accuracy against missing rate; one line per (model, metric).

    curves: label -> a result of :func:`evaluate_over_rates` (or its JSON). metrics default to
    Has0_acc_2 and Non0_acc_2 (regression) or Acc (classification), drawn in percent.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AlignMambaError(
            f"--plot {path}: drawing needs matplotlib (pip install matplotlib)"
        ) from None
    if not curves:
        raise ConfigError("plot_missing_curves: no curves given")
    first = next(iter(curves.values()))["rates"][0]
    if metrics is None:
        metrics = [k for k in _PLOT_METRICS_REGRESSION if k in first] or [
            k for k in _PLOT_METRICS_CLASSIFICATION if k in first
        ]
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for ci, (label, res) in enumerate(curves.items()):
        rows = sorted(res["rates"], key=lambda row: row["missing_rate"])
        xs = [row["missing_rate"] for row in rows]
        for mi, k in enumerate(metrics):
            ax.plot(
                xs,
                [100.0 * row[k] for row in rows],
                styles[mi % len(styles)],
                marker="o",
                color=f"C{ci}",
                label=f"{label}: {k}",
            )
    ax.set_xlabel("missing rate")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    from .checkpoint import atomic_write_bytes

    atomic_write_bytes(Path(path), buf.getvalue())
