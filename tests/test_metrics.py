"""MMSA metric definitions (alignmamba.metrics) against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alignmamba.metrics import classification_metrics, macro_f1, msa_metrics, pearson, weighted_f1

KEYS = [
    "Has0_acc_2",
    "Has0_F1_score",
    "Non0_acc_2",
    "Non0_F1_score",
    "Mult_acc_5",
    "Mult_acc_7",
    "MAE",
    "Corr",
]

# Ties at 0 (truth 0 is positive in Has0, dropped in Non0; pred 0.0 is positive in Has0,
# negative in Non0), half-way rounding (2.5 -> 2, -0.5 -> -0, 1.5 -> 2, -1.5 -> -2), clipping (3.6).
PRED = [2.5, -0.5, 1.5, 0.0, -1.2, -0.1, 3.6, -2.6]
TRUTH = [2.0, 0.0, 2.4, -0.4, -3.0, 0.7, 2.8, -1.5]


def test_msa_metrics_hand_computed() -> None:
    m = msa_metrics(PRED, TRUTH)
    assert list(m) == KEYS and all(type(v) is float for v in m.values())
    # Has0: pred>=0 TFTTFFTF vs truth>=0 TTTFFTTF -> 5/8;
    # F1(True) = 6/9 (support 5), F1(False) = 4/7 (support 3)
    assert m["Has0_acc_2"] == pytest.approx(5 / 8)
    assert m["Has0_F1_score"] == pytest.approx((5 * 6 / 9 + 3 * 4 / 7) / 8)
    # Non0 drops sample 1; pred>0 TTFFFTF vs truth>0 TTFFTTF -> 6/7; both classes F1 6/7
    assert m["Non0_acc_2"] == pytest.approx(6 / 7)
    assert m["Non0_F1_score"] == pytest.approx(6 / 7)
    # 7-class: pred -> [2,-0,2,0,-1,-0,3,-3], truth -> [2,0,2,-0,-3,1,3,-2]
    assert m["Mult_acc_7"] == pytest.approx(5 / 8)
    # 5-class: pred -> [2,-0,2,0,-1,-0,2,-2], truth -> [2,0,2,-0,-2,1,2,-2]
    assert m["Mult_acc_5"] == pytest.approx(6 / 8)
    assert m["MAE"] == pytest.approx(6.8 / 8)  # unclipped: |3.6 - 2.8| = 0.8 counts in full
    assert m["Corr"] == pytest.approx(np.corrcoef(PRED, TRUTH)[0, 1])


def test_half_way_rounding_is_half_to_even() -> None:
    # Half away from zero would give 3, -1 and 2: only half-to-even makes every pair agree.
    m = msa_metrics([2.5, -0.5, 1.5], [2.0, 0.0, 2.0])
    assert m["Mult_acc_7"] == 1.0 and m["Mult_acc_5"] == 1.0
    assert msa_metrics([0.5], [1.0])["Mult_acc_7"] == 0.0  # 0.5 -> 0
    assert msa_metrics([3.5], [3.0])["Mult_acc_7"] == 1.0  # clipped to 3 first
    assert (
        msa_metrics([2.7], [2.0])["Mult_acc_5"] == 1.0
        and msa_metrics([2.7], [2.0])["Mult_acc_7"] == 0.0
    )


def test_zero_ties() -> None:
    m = msa_metrics([0.0, -0.2, 0.0], [0.0, 0.0, 1.0])
    assert m["Has0_acc_2"] == pytest.approx(2 / 3)  # truth 0 is positive, pred 0 is positive
    assert m["Non0_acc_2"] == 0.0  # only sample 2 remains; pred 0.0 is not > 0
    assert m["Non0_F1_score"] == 0.0
    all_zero = msa_metrics([0.3, -0.3], [0.0, 0.0])
    assert math.isnan(all_zero["Non0_acc_2"]) and math.isnan(all_zero["Non0_F1_score"])


def test_corr_constant_is_zero_and_inputs_any_container() -> None:
    assert msa_metrics([1.0, 1.0, 1.0], [0.5, -1.0, 2.0])["Corr"] == 0.0
    assert msa_metrics([0.5, -1.0, 2.0], [1.0, 1.0, 1.0])["Corr"] == 0.0
    t_pred = torch.tensor([[0.5], [-1.0], [2.0]], requires_grad=True)
    from_torch = msa_metrics(t_pred, torch.tensor([1.0, -0.5, 1.5]))
    assert from_torch == msa_metrics(np.array([0.5, -1.0, 2.0]), [1.0, -0.5, 1.5])
    assert pearson(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.5])) == pytest.approx(
        np.corrcoef([1, 2, 3], [2, 4, 6.5])[0, 1]
    )
    with pytest.raises(ValueError, match="pred has 2 values but truth has 3"):
        msa_metrics([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="at least one sample"):
        msa_metrics([], [])


def test_weighted_and_macro_f1_hand_computed() -> None:
    truth = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 1, 0, 1, 2, 2])
    # per class F1: 0 -> 4/5 (support 3), 1 -> 2/4 (support 2), 2 -> 2/3 (support 1)
    assert weighted_f1(pred, truth) == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert macro_f1(pred, truth) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    m = classification_metrics(pred, truth, num_classes=3)
    assert m == pytest.approx(
        {"Acc": 4 / 6, "F1_macro": (0.8 + 0.5 + 2 / 3) / 3, "F1_weighted": (2.4 + 1 + 2 / 3) / 6}
    )
    # a class only predicted (2) has support 0: no weight in F1_weighted, F1 0 in F1_macro
    assert weighted_f1(np.array([0, 2, 1]), np.array([0, 0, 1])) == pytest.approx(
        (2 * 2 / 3 + 1) / 3
    )
    assert macro_f1(np.array([0, 2, 1]), np.array([0, 0, 1])) == pytest.approx((2 / 3 + 1 + 0) / 3)
    with pytest.raises(ValueError, match=r"pred_labels must be class ids in \[0, 3\)"):
        classification_metrics([0, 3], [0, 1], num_classes=3)


def _f1_reference(pred: np.ndarray, truth: np.ndarray) -> float:
    """Weighted F1 the textbook way: harmonic mean of precision and recall per truth class."""
    total = 0.0
    for c in np.unique(truth):
        tp = np.sum((pred == c) & (truth == c))
        precision = tp / np.sum(pred == c) if np.any(pred == c) else 0.0
        recall = tp / np.sum(truth == c)
        f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
        total += f1 * np.sum(truth == c)
    return total / truth.size


def test_weighted_f1_matches_textbook_definition_on_random_labels() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, k = int(rng.integers(1, 30)), int(rng.integers(2, 6))
        pred, truth = rng.integers(0, k, n), rng.integers(0, k, n)
        assert weighted_f1(pred, truth) == pytest.approx(_f1_reference(pred, truth), abs=1e-12)
