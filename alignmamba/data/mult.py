"""Loader for the MulT feature pickles (``mosi_data.pkl``, ``mosi_data_noalign.pkl``,
``mosei_senti_data*.pkl``).

Schema (SPEC.md section 2): ``{"train"|"valid"|"test": {"text": (N, T_l, 300) GloVe,
"audio": (N, T_a, d_a), "vision": (N, T_v, d_v), "labels": (N, 1, 1), "id": ...}}``.

These files store no lengths. We take padding to be trailing all-zero rows (as MMSA's
own length script for these features assumes), so a sample's true length is the index
of its last row with any non-zero (or inf/NaN) value plus one:

* aligned files (all modalities share T, e.g. 50): the three streams sit on the same
  word positions, so every modality gets the length of the union (the last position
  where any modality is non-zero); a word whose GloVe vector is zero keeps its slot;
* unaligned files: each modality separately.

A sample with no non-zero row at all gets length 0, which ``build_split`` turns into 1
(counted and warned). Only sentiment labels (one score per sample) are supported;
emotion files (IEMOCAP, labels (N, 4, 2)) are refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .dataset import (
    MODALITIES,
    MultimodalDataset,
    MultimodalSplit,
    assemble_dataset,
    build_split,
    read_features_and_labels,
    string_list,
    trailing_nonzero_lengths,
)

__all__ = ["load_mult"]


def _load_split(
    d: dict,
    where: str,
    split_name: str,
    counts: tuple[dict[str, int], dict[str, int]],
    inplace: bool,
) -> tuple[MultimodalSplit, bool]:
    feats, labels = read_features_and_labels(d, where, "labels")
    n = labels.shape[0]

    per_modality = {m: trailing_nonzero_lengths(feats[m]) for m in MODALITIES}
    aligned = len({feats[m].shape[1] for m in MODALITIES}) == 1
    if aligned:
        union = np.maximum.reduce([per_modality[m] for m in MODALITIES])
        lengths = {m: union for m in MODALITIES}
    else:
        lengths = per_modality

    ids = (
        string_list(d["id"], n, where, "id")
        if "id" in d
        else [f"{split_name}_{i}" for i in range(n)]
    )
    split = build_split(feats, lengths, labels, ids, where, split_name, counts, inplace=inplace)
    return split, aligned


def load_mult(obj: Any, source: str, *, inplace: bool = False) -> MultimodalDataset:
    """Build a :class:`MultimodalDataset` from an unpickled MulT dict (splits at top level).

    Lengths are derived from trailing all-zero rows (module docstring). inf/NaN become 0
    (counted in ``dataset.sanitized``). With ``inplace=True`` the arrays of ``obj`` may be
    modified in place.
    """
    return assemble_dataset(obj, source, "mult", _load_split, inplace)
