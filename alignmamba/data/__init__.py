"""Data: safe loading of MMSA / MulT feature pickles, datasets, batches, synthetic data.

>>> ds = load_dataset("unaligned_50.pkl")          # doctest: +SKIP
>>> loader = make_loader(ds["train"], batch_size=32, shuffle=True, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import DataError
from .dataset import (
    MODALITIES,
    MultimodalDataset,
    MultimodalSplit,
    SplitDataset,
    check_top_level,
    collate,
    labels_to_classes,
    make_loader,
)
from .inspect import inspect_report
from .mmsa import load_mmsa
from .mult import load_mult
from .safe_pickle import safe_load
from .synthetic import make_synthetic, write_synthetic

__all__ = [
    "MODALITIES",
    "MultimodalDataset",
    "MultimodalSplit",
    "SplitDataset",
    "collate",
    "detect_schema",
    "inspect_report",
    "labels_to_classes",
    "load_dataset",
    "load_mmsa",
    "load_mult",
    "make_loader",
    "make_synthetic",
    "safe_load",
    "write_synthetic",
]


def detect_schema(obj: Any, source: str) -> str:
    """``"mmsa"`` if a split has 'regression_labels', ``"mult"`` if it has 'labels'.

    Anything else is a DataError naming ``source``.
    """
    check_top_level(obj, source)
    splits = [obj[s] for s in ("train", "valid", "test") if isinstance(obj.get(s), dict)]
    if any("regression_labels" in s for s in splits):
        return "mmsa"
    if any("labels" in s for s in splits):
        return "mult"
    raise DataError(
        f"{source}: unknown layout: expected MMSA (splits with 'regression_labels') "
        "or MulT (splits with 'labels')"
    )


def load_dataset(path: str | os.PathLike[str]) -> MultimodalDataset:
    """Load an MMSA or MulT feature pickle (schema detected) with the restricted unpickler."""
    source = str(path)
    obj = safe_load(path)
    loader = load_mmsa if detect_schema(obj, source) == "mmsa" else load_mult
    # The freshly unpickled object is ours, so it may be cleaned in place (saves GBs on MOSEI).
    return loader(obj, source, inplace=True)
