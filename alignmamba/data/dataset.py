"""In-memory multimodal datasets, the torch ``Dataset`` wrapper and the batch collate.

A loaded file becomes a :class:`MultimodalDataset`: three :class:`MultimodalSplit`
objects holding float32 features ``(N, T_m, d_m)`` zero-padded at the back, the true
lengths ``(N,)`` (always >= 1), regression labels in [-3, 3] and ids.

The loaders (``mmsa.py``, ``mult.py``) share the checks and clean-up steps at the
bottom of this module (``build_split`` and helpers) so that both formats end up with
exactly the same invariants:

* features are float32, finite (inf/NaN replaced by 0, as MMSA and MulT do; the count
  is reported in ``MultimodalDataset.sanitized``), and exactly zero beyond each
  sample's true length, so padding never carries information;
* a true length of 0 (real unaligned MOSEI files contain a few empty audio/vision
  streams) becomes 1, i.e. one all-zero frame, counted in
  ``MultimodalDataset.zero_lengths`` and reported with one warning per file;
* labels are finite and inside [-3, 3] (a file that violates this is refused).

Classification targets follow MMSA's conventions (:func:`labels_to_classes`):
2 classes: 0 = negative (< 0), 1 = non-negative (>= 0), as Has0_acc_2;
3 classes: 0 = negative (< 0), 1 = neutral (== 0), 2 = positive (> 0);
5 classes: round(clip(y, -2, 2)) + 2; 7 classes: round(clip(y, -3, 3)) + 3, rounding
half to even like ``numpy.round`` (as Mult_acc_5 / Mult_acc_7).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..errors import ConfigError, DataError

__all__ = [
    "MODALITIES",
    "MultimodalDataset",
    "MultimodalSplit",
    "SplitDataset",
    "collate",
    "labels_to_classes",
    "make_loader",
]

MODALITIES: tuple[str, ...] = ("text", "audio", "vision")
SPLITS: tuple[str, ...] = ("train", "valid", "test")
TASKS: tuple[str, ...] = ("regression", "classification")
NUM_CLASSES: tuple[int, ...] = (2, 3, 5, 7)
LABEL_LIMIT = 3.0
# float32 round trips of labels such as 3.0 stay well inside this; further out is a bad file.
_LABEL_TOLERANCE = 1e-4
# Rows processed at a time when scanning features, so temporaries stay small for MOSEI (GBs).
_CHUNK = 512


@dataclass
class MultimodalSplit:
    """One split of a dataset.

    features: ``{m: (N, T_m, d_m) float32}``, zero beyond each sample's length.
    lengths: ``{m: (N,) int64}`` true lengths, ``1 <= length <= T_m``.
    labels: ``(N,) float32`` sentiment in [-3, 3].
    ids: N sample ids (MMSA style ``"video$_$clip"`` where the file has them).
    raw_text: N sentences or None.
    text_bert: ``(N, 3, T_l) int64`` token ids / attention mask / segment ids, or None.
    """

    features: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    labels: np.ndarray
    ids: list[str]
    raw_text: list[str] | None = None
    text_bert: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def modalities(self) -> list[str]:
        """Modalities present, in the canonical order text, audio, vision."""
        return [m for m in MODALITIES if m in self.features]

    def mask(self, modality: str) -> np.ndarray:
        """Boolean ``(N, T_m)`` mask, True on real time steps."""
        t = self.features[modality].shape[1]
        return np.arange(t)[None, :] < self.lengths[modality][:, None]

    def validate(self, where: str) -> None:
        """Check the invariants listed in the module docstring; DataError naming ``where``."""
        n = len(self)
        if n == 0:
            raise DataError(f"{where}: split is empty")
        if self.labels.shape != (n,) or self.labels.dtype != np.float32:
            raise DataError(
                f"{where}: labels must be (N,) float32, got {self.labels.shape} {self.labels.dtype}"
            )
        if len(self.ids) != n:
            raise DataError(f"{where}: {len(self.ids)} ids for {n} samples")
        if self.raw_text is not None and len(self.raw_text) != n:
            raise DataError(f"{where}: {len(self.raw_text)} raw_text entries for {n} samples")
        for m in self.modalities:
            x, ln = self.features[m], self.lengths[m]
            if x.ndim != 3 or x.shape[0] != n or x.dtype != np.float32:
                raise DataError(
                    f"{where}: {m} must be (N={n}, T, d) float32, got {x.shape} {x.dtype}"
                )
            if ln.shape != (n,) or ln.dtype != np.int64:
                raise DataError(
                    f"{where}: {m} lengths must be (N={n},) int64, got {ln.shape} {ln.dtype}"
                )
            if ln.min() < 1 or ln.max() > x.shape[1]:
                raise DataError(f"{where}: {m} lengths must lie in [1, {x.shape[1]}]")
        if self.text_bert is not None:
            tb = self.text_bert
            if tb.ndim != 3 or tb.shape[:2] != (n, 3) or tb.dtype != np.int64:
                raise DataError(
                    f"{where}: text_bert must be (N={n}, 3, T) int64, got {tb.shape} {tb.dtype}"
                )


@dataclass
class MultimodalDataset:
    """train/valid/test splits plus what the loader found and cleaned.

    ``sanitized`` counts the inf/NaN values replaced by 0 per ``"split/modality"``;
    ``zero_lengths`` counts samples whose stored length was 0 (now 1), same keys.
    ``aligned`` is True when all modalities share the text time steps.
    """

    splits: dict[str, MultimodalSplit]
    name: str
    source: str
    schema: str = ""
    aligned: bool = False
    sanitized: dict[str, int] = field(default_factory=dict)
    zero_lengths: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, split: str) -> MultimodalSplit:
        return self.splits[split]

    @property
    def modalities(self) -> list[str]:
        """Modalities present, in the order text, audio, vision."""
        return self.splits[SPLITS[0]].modalities

    @property
    def input_dims(self) -> dict[str, int]:
        """Feature width d_m per modality."""
        return {m: int(self.splits[SPLITS[0]].features[m].shape[2]) for m in self.modalities}

    @property
    def max_lengths(self) -> dict[str, int]:
        """Padded length T_m per modality (the largest over splits)."""
        return {
            m: max(int(s.features[m].shape[1]) for s in self.splits.values())
            for m in self.modalities
        }


def labels_to_classes(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Map sentiment scores (N,) in [-3, 3] to class ids (N,) int64 (MMSA conventions).

    2: negative (< 0) / non-negative; 3: negative / neutral (== 0) / positive;
    5: round(clip(y, -2, 2)) + 2; 7: round(clip(y, -3, 3)) + 3 (round half to even).
    """
    y = np.asarray(labels, dtype=np.float64)
    if num_classes == 2:
        return (y >= 0).astype(np.int64)
    if num_classes == 3:
        return (np.sign(y) + 1).astype(np.int64)
    if num_classes in (5, 7):
        half = (num_classes - 1) // 2
        return (np.round(np.clip(y, -half, half)) + half).astype(np.int64)
    raise ConfigError(f"num_classes={num_classes}: supported values are {list(NUM_CLASSES)}")


def _check_task(task: str, num_classes: int | None) -> None:
    if task not in TASKS:
        raise ConfigError(f"task={task!r}: expected one of {list(TASKS)}")
    if task == "classification" and num_classes not in NUM_CLASSES:
        raise ConfigError(
            f"num_classes={num_classes}: classification needs one of {list(NUM_CLASSES)}"
        )


class SplitDataset(torch.utils.data.Dataset):
    """``torch`` view of a :class:`MultimodalSplit`; items are trimmed to their own lengths.

    ``task="regression"`` yields float labels; ``"classification"`` maps them with
    :func:`labels_to_classes` (``num_classes`` in 2, 3, 5, 7).
    """

    def __init__(
        self, split: MultimodalSplit, task: str = "regression", num_classes: int | None = None
    ) -> None:
        _check_task(task, num_classes)
        self.split = split
        self.task = task
        self.num_classes = num_classes
        self.modalities = split.modalities
        if task == "classification":
            assert num_classes is not None
            self.targets: np.ndarray = labels_to_classes(split.labels, num_classes)
        else:
            self.targets = split.labels.astype(np.float32, copy=False)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.split
        lengths = {m: int(s.lengths[m][index]) for m in self.modalities}
        item: dict[str, Any] = {
            "features": {m: s.features[m][index, : lengths[m]] for m in self.modalities},
            "lengths": lengths,
            "label": self.targets[index],
            "index": int(index),
        }
        if s.text_bert is not None:
            item["text_bert"] = s.text_bert[index]
        return item


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pad items from :class:`SplitDataset` into the batch dict of docs/ARCHITECTURE.md.

    Returns ``{"features": {m: (B, T_m, d_m) float32}, "masks": {m: (B, T_m) bool},
    "label": (B,) float32 or int64, "index": (B,) int64, ["text_bert": (B, 3, T_text) int64]}``
    where ``T_m`` is the longest real length of modality m in this batch.
    """
    if not items:
        raise ValueError("collate needs at least one item")
    b = len(items)
    features: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for m in items[0]["features"]:
        lengths = torch.tensor([it["lengths"][m] for it in items], dtype=torch.int64)
        t = int(lengths.max())
        d = items[0]["features"][m].shape[-1]
        out = torch.zeros((b, t, d), dtype=torch.float32)
        for row, it in enumerate(items):
            x = it["features"][m]
            out[row, : x.shape[0]] = torch.from_numpy(np.ascontiguousarray(x))
        features[m] = out
        masks[m] = torch.arange(t)[None, :] < lengths[:, None]
    labels = np.asarray([it["label"] for it in items])
    batch: dict[str, Any] = {
        "features": features,
        "masks": masks,
        "label": torch.from_numpy(
            labels.astype(np.int64 if labels.dtype.kind in "iu" else np.float32)
        ),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
    }
    if "text_bert" in items[0]:
        # The token columns line up with the text positions, so they are trimmed alike.
        t_text = (
            features["text"].shape[1] if "text" in features else items[0]["text_bert"].shape[-1]
        )
        tb = np.stack([it["text_bert"][:, :t_text] for it in items])
        batch["text_bert"] = torch.from_numpy(tb.astype(np.int64, copy=False))
    return batch


def make_loader(
    split: MultimodalSplit,
    batch_size: int,
    shuffle: bool,
    seed: int,
    task: str = "regression",
    num_classes: int | None = None,
    sampler: Sampler | Iterable[int] | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A single-process ``DataLoader`` over ``split`` using :func:`collate`.

    Shuffling draws from a generator seeded with ``seed``, so the batch order is
    reproducible; ``sampler`` replaces shuffling (pass ``shuffle=False`` with it).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}: must be a positive integer")
    if sampler is not None and shuffle:
        raise ConfigError("make_loader: pass either shuffle=True or a sampler, not both")
    generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(
        SplitDataset(split, task=task, num_classes=num_classes),
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        drop_last=drop_last,
        collate_fn=collate,
        generator=generator,
        num_workers=0,
    )


# ---------------------------------------------------------------------------------------
# Building blocks shared by the MMSA and MulT loaders.
# ---------------------------------------------------------------------------------------


def numeric_array(value: Any, where: str, name: str, ndim: int | None = None) -> np.ndarray:
    """``value`` as a numeric ndarray (no copy when possible) or a DataError."""
    try:
        arr = np.asarray(value)
    except Exception as exc:  # noqa: BLE001 - ragged lists and the like
        raise DataError(f"{where}: '{name}' is not an array ({type(exc).__name__})") from None
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{where}: '{name}' must be numeric, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise DataError(f"{where}: '{name}' must have rank {ndim}, got shape {arr.shape}")
    return arr


def integer_lengths(value: Any, n: int, where: str, name: str) -> np.ndarray:
    """A length vector ``(n,)`` stored as ints or integral floats -> int64."""
    arr = numeric_array(value, where, name)
    if arr.size != n or arr.ndim > 2:
        raise DataError(f"{where}: '{name}' must hold {n} lengths, got shape {arr.shape}")
    arr = arr.reshape(n)
    if arr.dtype.kind == "f" and not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
        raise DataError(f"{where}: '{name}' must hold whole numbers")
    return arr.astype(np.int64)


def regression_labels(value: Any, n: int | None, where: str, name: str) -> np.ndarray:
    """Labels stored as (N,), (N, 1) or (N, 1, 1) -> (N,) float32, finite, in [-3, 3]."""
    arr = numeric_array(value, where, name)
    if arr.ndim == 0 or any(s != 1 for s in arr.shape[1:]):
        raise DataError(
            f"{where}: '{name}' has shape {arr.shape}; only one sentiment score per sample "
            "((N,), (N, 1) or (N, 1, 1)) is supported"
        )
    arr = arr.reshape(arr.shape[0]).astype(np.float64)
    if n is not None and arr.shape[0] != n:
        raise DataError(f"{where}: '{name}' has {arr.shape[0]} samples but the features have {n}")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise DataError(f"{where}: {int(bad.sum())} of {arr.shape[0]} labels are inf or NaN")
    outside = np.abs(arr) > LABEL_LIMIT + _LABEL_TOLERANCE
    if outside.any():
        raise DataError(
            f"{where}: {int(outside.sum())} of {arr.shape[0]} labels lie outside [-3, 3] "
            f"(min {arr.min():.4g}, max {arr.max():.4g})"
        )
    return np.clip(arr, -LABEL_LIMIT, LABEL_LIMIT).astype(np.float32)


def trailing_nonzero_lengths(x: np.ndarray) -> np.ndarray:
    """``(N, T, d) -> (N,)``: index of the last row with any non-zero value, plus one.

    Rows holding inf or NaN count as non-zero (they are real frames before sanitising).
    A sample with no non-zero row gets 0 (the caller decides what that means).
    """
    n, t = x.shape[0], x.shape[1]
    out = np.zeros(n, dtype=np.int64)
    for lo in range(0, n, _CHUNK):
        real = (x[lo : lo + _CHUNK] != 0).any(axis=2)  # (n_chunk, T)
        last = t - np.argmax(real[:, ::-1], axis=1)
        out[lo : lo + _CHUNK] = np.where(real.any(axis=1), last, 0)
    return out


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if (isinstance(value, np.ndarray) and value.ndim > 0) or isinstance(value, (list, tuple)):
        return "$_$".join(_text(part) for part in np.ravel(np.asarray(value, dtype=object)))
    return str(value)


def string_list(value: Any, n: int, where: str, name: str) -> list[str]:
    """ids / raw_text: N entries; a row of several parts (MulT ids) is joined with '$_$'."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        raise DataError(f"{where}: '{name}' must be a sequence of {n} entries")
    if len(value) != n:
        raise DataError(f"{where}: '{name}' has {len(value)} entries but the split has {n} samples")
    try:
        return [_text(v) for v in value]
    except Exception as exc:  # noqa: BLE001 - e.g. a str array holding invalid code points
        raise DataError(
            f"{where}: '{name}' holds entries that are not text ({type(exc).__name__})"
        ) from None


def _float32_finite(x: np.ndarray, inplace: bool) -> tuple[np.ndarray, int]:
    """Cast to float32 and replace inf/NaN by 0 chunk-wise; returns (array, count replaced)."""
    if x.dtype != np.float32 or not inplace or not x.flags.writeable:
        x = x.astype(np.float32)  # a fresh array we may modify
    count = 0
    for lo in range(0, x.shape[0], _CHUNK):
        block = x[lo : lo + _CHUNK]
        bad = ~np.isfinite(block)
        c = int(bad.sum())
        if c:
            block[bad] = 0.0
            count += c
    return x, count


def build_split(
    features: dict[str, np.ndarray],
    lengths: dict[str, np.ndarray],
    labels: np.ndarray,
    ids: list[str],
    where: str,
    split_name: str,
    dataset_counts: tuple[dict[str, int], dict[str, int]],
    raw_text: list[str] | None = None,
    text_bert: np.ndarray | None = None,
    inplace: bool = False,
) -> MultimodalSplit:
    """Check lengths, clean features and assemble a validated :class:`MultimodalSplit`.

    ``features`` are rank-3 numeric arrays with equal N; ``lengths`` int64 ``(N,)``.
    Lengths above T or below 0 are refused; 0 becomes 1 and is counted. Features are
    cast to float32, inf/NaN become 0 (counted) and everything beyond the length is 0.
    With ``inplace`` the input arrays may be modified (the caller owns them).
    """
    sanitized, zero_lengths = dataset_counts
    out_feats: dict[str, np.ndarray] = {}
    out_lens: dict[str, np.ndarray] = {}
    for m in MODALITIES:
        if m not in features:
            continue
        x, ln = features[m], lengths[m]
        t = x.shape[1]
        if ln.max(initial=0) > t:
            bad = int((ln > t).sum())
            raise DataError(
                f"{where}: {bad} {m} lengths exceed the padded length {t} (max {int(ln.max())})"
            )
        if ln.min(initial=0) < 0:
            raise DataError(f"{where}: {int((ln < 0).sum())} {m} lengths are negative")
        x, count = _float32_finite(x, inplace)
        if count:
            sanitized[f"{split_name}/{m}"] = count
        # zeroing uses the stored length, so a length-0 sample becomes one all-zero frame
        for lo in range(0, x.shape[0], _CHUNK):
            block = x[lo : lo + _CHUNK]
            block[np.arange(t)[None, :] >= ln[lo : lo + _CHUNK, None]] = 0.0
        zeros = int((ln == 0).sum())
        if zeros:
            zero_lengths[f"{split_name}/{m}"] = zeros
            ln = np.maximum(ln, 1)
        out_feats[m], out_lens[m] = x, ln.astype(np.int64, copy=False)
    split = MultimodalSplit(
        out_feats, out_lens, labels, ids, raw_text=raw_text, text_bert=text_bert
    )
    split.validate(where)
    return split


def check_top_level(obj: Any, source: str) -> None:
    """A feature pickle is a dict of splits."""
    if not isinstance(obj, dict):
        kind = type(obj).__name__
        raise DataError(
            f"{source}: top level is a {kind}, expected a dict of splits (train/valid/test)"
        )


def _check_splits(obj: Any, source: str, kind: str) -> dict[str, dict]:
    """The top-level dict must map train/valid/test to dicts."""
    check_top_level(obj, source)
    out = {}
    for s in SPLITS:
        if s not in obj:
            raise DataError(f"{source}: missing split '{s}' ({kind} files have train/valid/test)")
        if not isinstance(obj[s], dict):
            raise DataError(f"{source}: split '{s}' is a {type(obj[s]).__name__}, expected a dict")
        out[s] = obj[s]
    return out


SplitLoader = Callable[
    [dict, str, str, "tuple[dict[str, int], dict[str, int]]", bool], "tuple[MultimodalSplit, bool]"
]


def assemble_dataset(
    obj: Any, source: str, schema: str, load_split: SplitLoader, inplace: bool
) -> MultimodalDataset:
    """Run a format's ``load_split(d, where, split_name, counts, inplace) -> (split, aligned)``
    over train/valid/test and check what must agree between splits."""
    kind = {"mmsa": "MMSA", "mult": "MulT"}.get(schema, schema)
    raw = _check_splits(obj, source, kind)
    counts: tuple[dict[str, int], dict[str, int]] = ({}, {})
    splits: dict[str, MultimodalSplit] = {}
    aligned: dict[str, bool] = {}
    for name, d in raw.items():
        splits[name], aligned[name] = load_split(
            d, f"{source}: split '{name}'", name, counts, inplace
        )
    if len(set(aligned.values())) > 1:
        which = [s for s, a in aligned.items() if a]
        raise DataError(f"{source}: splits disagree on alignment (only {which} look aligned)")
    ref = splits[SPLITS[0]]
    for name, s in splits.items():
        for m in ref.modalities:
            if s.features[m].shape[2] != ref.features[m].shape[2]:
                raise DataError(
                    f"{source}: {m} width differs between splits "
                    f"(train {ref.features[m].shape[2]}, {name} {s.features[m].shape[2]})"
                )
    dataset = MultimodalDataset(
        splits=splits,
        name=Path(source).stem,
        source=source,
        schema=schema,
        aligned=aligned[SPLITS[0]],
        sanitized=counts[0],
        zero_lengths=counts[1],
    )
    if dataset.zero_lengths:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(dataset.zero_lengths.items()))
        warnings.warn(
            f"{source}: samples with length 0 were given length 1 (one all-zero frame): {detail}",
            stacklevel=3,
        )
    return dataset


def read_features_and_labels(
    d: dict, where: str, label_key: str
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The three rank-3 feature arrays (equal, non-zero N) and the checked (N,) labels."""
    feats = {m: numeric_array(require_key(d, m, where), where, m, ndim=3) for m in MODALITIES}
    raw_labels = require_key(d, label_key, where)
    n = feats["text"].shape[0]
    for m in MODALITIES[1:]:
        if feats[m].shape[0] != n:
            raise DataError(f"{where}: '{m}' has {feats[m].shape[0]} samples but 'text' has {n}")
    if n == 0:
        raise DataError(f"{where}: split is empty")
    return feats, regression_labels(raw_labels, n, where, label_key)


def require_key(split: dict, key: str, where: str) -> Any:
    if key not in split:
        raise DataError(f"{where}: missing key '{key}'")
    return split[key]
