"""A plain-text report on a feature pickle: what is in it and what looks wrong.

``inspect_report(path)`` lists every split's keys with shapes, dtypes and inf/NaN
counts straight from the file (so it works on files the loaders refuse), then loads the
file like :func:`alignmamba.data.load_dataset` and adds label and length statistics and
a list of suspicious findings. An unreadable or hostile file raises DataError; a file
that the loaders refuse yields a report ending with the loader's error.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .dataset import SPLITS, MultimodalDataset
from .safe_pickle import safe_load

__all__ = ["inspect_report"]

_SAMPLE_ROWS = 512  # samples used for the per-dimension (constant feature) check


def _describe(value: Any) -> tuple[str, str, str]:
    """(shape, dtype, note) of one stored value."""
    if isinstance(value, np.ndarray):
        note = ""
        if value.dtype.kind == "f":
            n_inf, n_nan = int(np.isinf(value).sum()), int(np.isnan(value).sum())
            note = ", ".join(
                s for s in (f"{n_inf} inf" if n_inf else "", f"{n_nan} NaN" if n_nan else "") if s
            )
        return str(value.shape), str(value.dtype), note
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(v).__name__ for v in value[:1000]})
        return f"[{len(value)}]", f"{type(value).__name__} of {'/'.join(kinds) or '-'}", ""
    return "-", type(value).__name__, ""


def _raw_listing(obj: Any) -> list[str]:
    lines: list[str] = []
    if not isinstance(obj, dict):
        return [f"top level: {type(obj).__name__} (expected a dict of splits)"]
    for split in obj:
        d = obj[split]
        if not isinstance(d, dict):
            lines.append(f"[{split}] {type(d).__name__}")
            continue
        lines.append(f"[{split}]")
        for key, value in d.items():
            shape, dtype, note = _describe(value)
            lines.append(f"  {key!s:<24}{shape:<20}{dtype:<16}{note}".rstrip())
    return lines


def _stats(values: np.ndarray) -> str:
    v = np.asarray(values, dtype=np.float64)
    return f"min {v.min():.4g}  mean {v.mean():.4g}  std {v.std():.4g}  max {v.max():.4g}"


def _findings(ds: MultimodalDataset) -> list[str]:
    out: list[str] = []
    for key, count in sorted(ds.sanitized.items()):
        out.append(f"{key}: {count} inf/NaN values (replaced by 0 when loading, as MMSA/MulT do)")
    for key, count in sorted(ds.zero_lengths.items()):
        out.append(f"{key}: {count} samples of length 0 (loaded as length 1, one zero frame)")
    seen: dict[str, str] = {}
    videos: dict[str, set[str]] = {}
    for name, s in ds.splits.items():
        dup = [i for i, c in Counter(s.ids).items() if c > 1]
        if dup:
            out.append(f"{name}: {len(dup)} ids occur more than once (e.g. {dup[0]!r})")
        shared = [i for i in s.ids if seen.get(i, name) != name]
        if shared:
            out.append(
                f"{name}: {len(shared)} ids also occur in split '{seen[shared[0]]}' "
                f"(e.g. {shared[0]!r})"
            )
        for i in s.ids:
            seen.setdefault(i, name)
        videos[name] = {i.split("$_$")[0] for i in s.ids if "$_$" in i}
        if float(s.labels.std()) == 0.0:
            out.append(f"{name}: all labels equal {float(s.labels[0]):.4g}")
        for m in s.modalities:
            t = s.features[m].shape[1]
            full = float((s.lengths[m] == t).mean())
            if full > 0.2 and not ds.aligned:
                out.append(
                    f"{name}/{m}: {full:.0%} of samples fill all {t} steps "
                    "(sequences probably truncated)"
                )
            rows = s.features[m][:_SAMPLE_ROWS]
            mask = s.mask(m)[:_SAMPLE_ROWS]
            real = rows[mask]
            if real.shape[0] > 1:
                const = int((real.std(axis=0) == 0).sum())
                if const:
                    out.append(f"{name}/{m}: {const} of {real.shape[1]} feature dims are constant")
        first_text_zero = (
            int((~s.features["text"][:, 0].any(axis=1)).sum()) if "text" in s.features else 0
        )
        if first_text_zero:
            out.append(
                f"{name}/text: {first_text_zero} samples start with an all-zero row "
                "(padding at the front? the loaders expect it at the back)"
            )
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        both = videos.get(a, set()) & videos.get(b, set())
        if both:
            out.append(f"{len(both)} videos have clips in both '{a}' and '{b}' (speaker overlap?)")
    return out


def inspect_report(path: str | os.PathLike[str]) -> str:
    """Human-readable report on the pickle at ``path`` (splits, shapes, dtypes, label and
    length statistics, inf/NaN counts, zero-length samples, suspicious findings)."""
    from . import detect_schema, load_mmsa, load_mult  # the package imports this module

    source = str(path)
    obj = safe_load(path)
    size = Path(path).stat().st_size
    lines = [f"file: {source} ({size / 2**20:.1f} MiB)"]
    lines += _raw_listing(obj)
    try:
        schema = detect_schema(obj, source)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zero lengths are reported below instead
            loader = load_mmsa if schema == "mmsa" else load_mult
            ds = loader(obj, source, inplace=True)
    except DataError as exc:
        lines.append(f"PROBLEM: {exc}")
        return "\n".join(lines)

    lines.append(
        f"schema: {schema.upper() if schema == 'mmsa' else 'MulT'}, "
        f"{'aligned' if ds.aligned else 'unaligned'}, modalities {ds.modalities}, "
        f"widths {ds.input_dims}, padded lengths {ds.max_lengths}"
    )
    for name in SPLITS:
        s = ds.splits[name]
        y = s.labels
        lines.append(f"{name}: {len(s)} samples")
        lines.append(
            f"  labels   {_stats(y)}  | positive {np.mean(y > 0):.1%}  zero {np.mean(y == 0):.1%}  "
            f"negative {np.mean(y < 0):.1%}"
        )
        for m in s.modalities:
            ln = s.lengths[m]
            lines.append(
                f"  {m:<8} length min {ln.min()}  mean {ln.mean():.1f}  max {ln.max()} "
                f"(padded {s.features[m].shape[1]})"
            )
    findings = _findings(ds)
    lines.append("suspicious:" if findings else "suspicious: nothing found")
    lines += [f"  - {f}" for f in findings]
    return "\n".join(lines)
