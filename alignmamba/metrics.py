"""Evaluation metrics with MMSA's definitions (SPEC.md section 3), in plain numpy.

``msa_metrics`` reproduces MMSA's regression evaluation for MOSI/MOSEI so that our
numbers compare with published tables:

* Has0_acc_2 / Has0_F1_score: truth and prediction binarised with ``>= 0``;
* Non0_acc_2 / Non0_F1_score: only samples whose truth is not 0, binarised with ``> 0``;
* Mult_acc_7 / Mult_acc_5: clip both to [-3, 3] / [-2, 2], round half to even
  (``numpy.round``: 2.5 -> 2, -0.5 -> -0, 1.5 -> 2), compare;
* MAE on unclipped values; Corr: Pearson correlation.

F1 scores are support-weighted over the classes present in truth or prediction (as
scikit-learn's ``f1_score(average="weighted")``; a class that is never predicted has
F1 0). Deviations from MMSA, both for robustness: values are not rounded to 4 decimals
(MMSA rounds for display), Corr is 0.0 instead of NaN when either input is constant,
and the Non0 scores are NaN when no truth is non-zero (MMSA would fail).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "classification_metrics",
    "f1_per_class",
    "macro_f1",
    "msa_metrics",
    "pearson",
    "weighted_f1",
]


def _flat(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensors (on any device) without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _pair(pred: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    p, t = _flat(pred), _flat(truth)
    if p.shape != t.shape:
        raise ValueError(f"pred has {p.size} values but truth has {t.size}")
    if p.size == 0:
        raise ValueError("metrics need at least one sample")
    return p, t


def f1_per_class(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classes, F1 per class, support in truth) over the classes present in either input.

    F1_c = 2 TP / (2 TP + FP + FN), which is 0 when class c is never predicted correctly.
    """
    classes = np.union1d(pred, truth)
    f1 = np.empty(classes.shape[0], dtype=np.float64)
    support = np.empty(classes.shape[0], dtype=np.float64)
    for i, c in enumerate(classes):
        tp = float(np.sum((pred == c) & (truth == c)))
        fp = float(np.sum((pred == c) & (truth != c)))
        fn = float(np.sum((pred != c) & (truth == c)))
        f1[i] = 2 * tp / (2 * tp + fp + fn)  # denominator > 0: c occurs in pred or truth
        support[i] = tp + fn
    return classes, f1, support


def weighted_f1(pred: np.ndarray, truth: np.ndarray) -> float:
    """Support-weighted F1 (scikit-learn ``average="weighted"``)."""
    _, f1, support = f1_per_class(np.asarray(pred), np.asarray(truth))
    return float(np.sum(f1 * support) / np.sum(support))


def macro_f1(pred: np.ndarray, truth: np.ndarray) -> float:
    """Unweighted mean F1 over the classes present in truth or prediction."""
    _, f1, _ = f1_per_class(np.asarray(pred), np.asarray(truth))
    return float(np.mean(f1))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; 0.0 when either input is constant (np.corrcoef gives NaN)."""
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt(np.sum(xc * xc) * np.sum(yc * yc))
    if denom == 0.0:
        return 0.0
    return float(np.clip(np.sum(xc * yc) / denom, -1.0, 1.0))


def _mult_acc(pred: np.ndarray, truth: np.ndarray, limit: float) -> float:
    p = np.round(np.clip(pred, -limit, limit))
    t = np.round(np.clip(truth, -limit, limit))
    return float(np.mean(p == t))


def msa_metrics(pred: Any, truth: Any) -> dict[str, float]:
    """MMSA's MOSI/MOSEI regression metrics for sentiment scores ``pred``, ``truth`` (N,).

    Returns python floats under Has0_acc_2, Has0_F1_score, Non0_acc_2, Non0_F1_score,
    Mult_acc_5, Mult_acc_7, MAE, Corr (module docstring gives the definitions).
    """
    p, t = _pair(pred, truth)
    has0_p, has0_t = p >= 0, t >= 0
    keep = t != 0
    if keep.any():
        non0_p, non0_t = p[keep] > 0, t[keep] > 0
        non0_acc, non0_f1 = float(np.mean(non0_p == non0_t)), weighted_f1(non0_p, non0_t)
    else:
        non0_acc = non0_f1 = float("nan")
    return {
        "Has0_acc_2": float(np.mean(has0_p == has0_t)),
        "Has0_F1_score": weighted_f1(has0_p, has0_t),
        "Non0_acc_2": non0_acc,
        "Non0_F1_score": non0_f1,
        "Mult_acc_5": _mult_acc(p, t, 2.0),
        "Mult_acc_7": _mult_acc(p, t, 3.0),
        "MAE": float(np.mean(np.abs(p - t))),
        "Corr": pearson(p, t),
    }


def classification_metrics(
    pred_labels: Any, truth_labels: Any, num_classes: int
) -> dict[str, float]:
    """Acc, F1_macro, F1_weighted for integer class ids in [0, num_classes) (N,).

    F1_macro averages over the classes present in truth or prediction (scikit-learn's
    default), not over all ``num_classes``.
    """
    p, t = _pair(pred_labels, truth_labels)
    for name, arr in (("pred_labels", p), ("truth_labels", t)):
        if not np.all((arr == np.round(arr)) & (arr >= 0) & (arr < num_classes)):
            raise ValueError(f"{name} must be class ids in [0, {num_classes})")
    return {
        "Acc": float(np.mean(p == t)),
        "F1_macro": macro_f1(p, t),
        "F1_weighted": weighted_f1(p, t),
    }
