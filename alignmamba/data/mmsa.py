"""Loader for the MMSA feature pickles (``aligned_50.pkl``, ``unaligned_50.pkl``).

Schema (SPEC.md section 2): ``{"train"|"valid"|"test": {"text": (N, 50, 768),
"text_bert": (N, 3, 50), "audio": (N, T_a, d_a), "vision": (N, T_v, d_v),
["audio_lengths", "vision_lengths"], "regression_labels": (N,), "id", "raw_text", ...}}``.

True lengths:
* text: the attention mask (row 1 of ``text_bert``) summed, where the file has
  ``text_bert``; otherwise the last non-zero row of ``text`` plus one;
* unaligned files: ``audio_lengths`` / ``vision_lengths`` as stored;
* aligned files (no ``*_lengths``): audio and vision sit on the text positions, so they
  take the text length.

Unused keys (``classification_labels``, ``annotations``) are ignored: class targets are
derived from the regression labels (see ``dataset.labels_to_classes``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import DataError
from .dataset import (
    MODALITIES,
    MultimodalDataset,
    MultimodalSplit,
    assemble_dataset,
    build_split,
    integer_lengths,
    numeric_array,
    read_features_and_labels,
    string_list,
    trailing_nonzero_lengths,
)

__all__ = ["load_mmsa"]


def _text_bert(value: Any, n: int, t_text: int, where: str) -> np.ndarray:
    tb = numeric_array(value, where, "text_bert", ndim=3)
    if tb.shape != (n, 3, t_text):
        raise DataError(f"{where}: 'text_bert' must have shape ({n}, 3, {t_text}), got {tb.shape}")
    if tb.dtype.kind == "f" and not (np.isfinite(tb).all() and (tb == np.round(tb)).all()):
        raise DataError(
            f"{where}: 'text_bert' must hold whole numbers (token ids, mask, segment ids)"
        )
    tb = tb.astype(np.int64)
    mask = tb[:, 1, :]
    if not np.isin(mask, (0, 1)).all():
        raise DataError(f"{where}: 'text_bert' row 1 (attention mask) must hold only 0 and 1")
    if (np.diff(mask, axis=1) > 0).any():
        raise DataError(
            f"{where}: 'text_bert' attention mask has a 1 after a 0 (padding must be at the back)"
        )
    return tb


def _load_split(
    d: dict,
    where: str,
    split_name: str,
    counts: tuple[dict[str, int], dict[str, int]],
    inplace: bool,
) -> tuple[MultimodalSplit, bool]:
    feats, labels = read_features_and_labels(d, where, "regression_labels")
    n = labels.shape[0]
    t_text = feats["text"].shape[1]

    text_bert = None
    if "text_bert" in d:
        text_bert = _text_bert(d["text_bert"], n, t_text, where)
        text_len = text_bert[:, 1, :].sum(axis=1)
    else:
        text_len = trailing_nonzero_lengths(feats["text"])

    has_a, has_v = "audio_lengths" in d, "vision_lengths" in d
    if has_a != has_v:
        present, absent = (
            ("audio_lengths", "vision_lengths") if has_a else ("vision_lengths", "audio_lengths")
        )
        raise DataError(f"{where}: has '{present}' but no '{absent}' (expected both or neither)")
    aligned = not has_a
    if aligned:
        for m in MODALITIES[1:]:
            if feats[m].shape[1] != t_text:
                raise DataError(
                    f"{where}: no audio_lengths/vision_lengths (an aligned file), but '{m}' has "
                    f"{feats[m].shape[1]} time steps and 'text' {t_text}"
                )
        lengths = {m: text_len for m in MODALITIES}
    else:
        lengths = {
            "text": text_len,
            "audio": integer_lengths(d["audio_lengths"], n, where, "audio_lengths"),
            "vision": integer_lengths(d["vision_lengths"], n, where, "vision_lengths"),
        }

    ids = (
        string_list(d["id"], n, where, "id")
        if "id" in d
        else [f"{split_name}_{i}" for i in range(n)]
    )
    raw_text = string_list(d["raw_text"], n, where, "raw_text") if "raw_text" in d else None
    split = build_split(
        feats,
        lengths,
        labels,
        ids,
        where,
        split_name,
        counts,
        raw_text=raw_text,
        text_bert=text_bert,
        inplace=inplace,
    )
    return split, aligned


def load_mmsa(obj: Any, source: str, *, inplace: bool = False) -> MultimodalDataset:
    """Build a :class:`MultimodalDataset` from an unpickled MMSA dict.

    ``source`` names the file in error messages. inf/NaN features become 0 (counted in
    ``dataset.sanitized``); zero lengths become 1 (counted in ``dataset.zero_lengths``,
    one warning). With ``inplace=True`` the arrays of ``obj`` may be modified in place
    (saves a copy of MOSEI-sized arrays when the caller owns ``obj``).
    """
    return assemble_dataset(obj, source, "mmsa", _load_split, inplace)
