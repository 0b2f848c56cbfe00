"""Resumable training state without pickle: tensors in safetensors, everything else in JSON.

After every epoch the loop in ``train.py`` saves ``seed_<s>/last/``::

    config.json               model config + {"experiment", "seed", "epoch"} (as best/)
    model.safetensors         the weights
    train_state.json          loop counters, log rows, optimizer/scheduler structure, RNG states
    train_state.safetensors   every tensor of the above (optimizer moments, RNG byte states)

The whole directory is swapped in atomically (:func:`alignmamba.checkpoint.replace_dir`).
Nothing here unpickles: :func:`encode_state` turns a nested structure of dicts, lists,
tuples, scalars, numpy arrays and tensors into strict JSON plus a flat ``{key: tensor}``
dict (keys are the paths, e.g. ``optimizer.state.0.exp_avg``); :func:`decode_state`
rebuilds it and refuses anything it did not write.

Exact resumption needs the data order to depend only on (seed, epoch):
:func:`reseed_epoch` reseeds the loader's shuffle generator at every epoch start.

The best checkpoint follows a small commit protocol so that ``best/`` always matches the
``best_epoch`` recorded in ``last/``: an improved epoch is first written to
``.best.pending``, then ``last/`` (which names that epoch), then ``.best.pending``
replaces ``best/``. :func:`recover_seed_dir` finishes or discards a pending best after a
kill.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    checkpoint_files,
    recover_dir,
    replace_dir,
    swap_dir,
)
from .errors import AlignMambaError, CheckpointError

LAST = "last"
BEST = "best"
PENDING_BEST = ".best.pending"
RESULT = "result.json"
STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"
FORMAT = "alignmamba-train-state"
VERSION = 1

__all__ = [
    "BEST",
    "LAST",
    "RESULT",
    "clear_seed_dir",
    "commit_best",
    "decode_state",
    "encode_state",
    "load_last",
    "read_result",
    "recover_seed_dir",
    "reseed_epoch",
    "save_last",
    "stage_best",
]

_MARKERS = ("__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__")


# ------------------------------------------------------------------ codec

def encode_state(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """``obj`` as strict JSON; tensors go to ``tensors`` under their path and leave a marker."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else {"__float__": repr(x)}  # 'inf', '-inf', 'nan'
    if isinstance(obj, torch.Tensor):
        if path in tensors:
            raise ValueError(f"duplicate tensor path {path!r}")
        tensors[path] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"{path}: numpy dtype {obj.dtype} cannot be stored")
        return {"__ndarray__": encode_state(obj.tolist(), tensors, path), "dtype": obj.dtype.str}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in obj):
            return {k: encode_state(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__dict__": [[encode_state(k, tensors, f"{path}.key{i}"), encode_state(v, tensors, f"{path}.{k}")]
                             for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"{path}: {type(obj).__name__} cannot be stored in a training state")


def decode_state(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """Inverse of :func:`encode_state`; CheckpointError naming ``where`` on anything unexpected."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [decode_state(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: unexpected value of type {type(obj).__name__}")
    marker = [k for k in _MARKERS if k in obj]
    if not marker:
        return {k: decode_state(v, tensors, where) for k, v in obj.items()}
    kind = marker[0]
    val = obj[kind]
    if kind == "__tensor__":
        if not isinstance(val, str) or val not in tensors:
            raise CheckpointError(f"{where}: refers to tensor {val!r} that {STATE_TENSORS} does not hold")
        return tensors[val]
    if kind == "__float__":
        if val not in ("inf", "-inf", "nan"):
            raise CheckpointError(f"{where}: bad float {val!r}")
        return float(val)
    if kind == "__tuple__":
        if not isinstance(val, list):
            raise CheckpointError(f"{where}: bad tuple")
        return tuple(decode_state(v, tensors, where) for v in val)
    if kind == "__dict__":
        if not isinstance(val, list) or not all(isinstance(p, list) and len(p) == 2 for p in val):
            raise CheckpointError(f"{where}: bad mapping")
        out = {}
        for k, v in val:
            key = decode_state(k, tensors, where)
            if not isinstance(key, (str, int, float, bool, tuple)) and key is not None:
                raise CheckpointError(f"{where}: bad mapping key")
            out[key] = decode_state(v, tensors, where)
        return out
    # __ndarray__
    dtype = obj.get("dtype")
    try:
        dt = np.dtype(dtype) if isinstance(dtype, str) else None
    except TypeError:
        dt = None
    if dt is None or dt.kind not in "biuf":
        raise CheckpointError(f"{where}: bad array dtype {dtype!r}")
    try:
        return np.asarray(decode_state(val, tensors, where), dtype=dt)
    except (TypeError, ValueError, OverflowError):
        raise CheckpointError(f"{where}: bad array") from None


# ------------------------------------------------------------------ RNG and data order

def reseed_epoch(loader: Any, seed: int, epoch: int) -> None:
    """Reseed the loader's shuffle generator with ``seed * 1000 + epoch``: the batches of an
    epoch depend only on (seed, epoch), so a resumed run draws exactly the same ones."""
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(int(seed) * 1000 + int(epoch))


def _capture_rng(loader: Any, missing: Any) -> dict[str, Any]:
    rng: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                           "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        rng["loader"] = gen.get_state()
    if missing is not None:
        mrng = getattr(missing, "rng", None)
        if isinstance(mrng, np.random.Generator):
            rng["missing"] = mrng.bit_generator.state
        else:
            _warn_once(f"{type(missing).__name__} keeps no numpy Generator in .rng: a resumed run "
                       "may draw different missing-modality masks")
    return rng


def _restore_rng(rng: dict[str, Any], loader: Any, missing: Any) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        states = rng["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:
            _warn_once("resuming on a different number of GPUs: CUDA random states are not restored")
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator) and "loader" in rng:
        gen.set_state(rng["loader"])
    if missing is not None and "missing" in rng and isinstance(getattr(missing, "rng", None), np.random.Generator):
        missing.rng.bit_generator.state = rng["missing"]


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, stacklevel=3)


# ------------------------------------------------------------------ last/

def save_last(seed_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, loader: Any,
              missing: Any, loop: dict[str, Any], extra: dict[str, Any]) -> None:
    """Atomically replace ``seed_dir/last`` with the state after epoch ``loop["epoch"]``.

    loop: {"epoch", "best_loss", "best_epoch", "bad_epochs", "rows", "stop_reason"}.
    """
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    body = {
        "format": FORMAT, "version": VERSION,
        "loop": encode_state(loop, tensors, "loop"),
        "optimizer": encode_state(opt.state_dict(), tensors, "optimizer"),
        "scheduler": encode_state(sched.state_dict(), tensors, "scheduler"),
        "rng": encode_state(_capture_rng(loader, missing), tensors, "rng"),
    }
    text = json.dumps(body, allow_nan=False, separators=(",", ":"))
    files = {STATE_JSON: text.encode("utf-8"), STATE_TENSORS: save(tensors, metadata={"format": "pt"})}
    replace_dir(seed_dir / LAST, {**checkpoint_files(model, {**extra, "epoch": loop["epoch"]}), **files})


def _read_state(last: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    jpath, tpath = last / STATE_JSON, last / STATE_TENSORS
    for p in (jpath, tpath):
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (not a resumable checkpoint)")
    try:
        body = json.loads(jpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{jpath}: invalid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT or body.get("version") != VERSION:
        raise CheckpointError(f"{jpath}: not a {FORMAT} version {VERSION} file")
    try:
        tensors = load_file(str(tpath), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{tpath}: unreadable safetensors file ({str(e).splitlines()[0]})") from None
    state = {k: decode_state(body.get(k), tensors, str(jpath)) for k in ("loop", "optimizer", "scheduler", "rng")}
    loop = state["loop"]
    need = {"epoch": int, "best_loss": float, "best_epoch": int, "bad_epochs": int, "rows": list}
    if not isinstance(loop, dict) or any(not isinstance(loop.get(k), t) for k, t in need.items()):
        raise CheckpointError(f"{jpath}: 'loop' must hold {', '.join(need)}")
    return state


def load_last(seed_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, loader: Any,
              missing: Any, experiment: dict[str, Any]) -> dict[str, Any] | None:
    """Restore model, optimizer, scheduler and RNG states from ``seed_dir/last``.

    Returns the loop counters, or None when there is no ``last/`` (the seed starts fresh).
    ``experiment`` (the resolved config) must match the one ``last/`` was written with.
    """
    from .checkpoint import load_checkpoint

    last = seed_dir / LAST
    recover_seed_dir(seed_dir)
    if not last.is_dir():
        return None
    state = _read_state(last)
    meta = json.loads((last / CONFIG_NAME).read_text(encoding="utf-8")) if (last / CONFIG_NAME).is_file() else {}
    _check_same_experiment(last / CONFIG_NAME, meta.get("experiment"), experiment)
    saved = load_checkpoint(last, "cpu")
    try:
        model.load_state_dict(saved.state_dict())
    except RuntimeError as e:
        raise CheckpointError(f"{last / WEIGHTS_NAME}: does not fit the model ({str(e).splitlines()[0]})") from None
    try:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _restore_rng(state["rng"], loader, missing)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"{last / STATE_JSON}: cannot restore the training state "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return state["loop"]


def _check_same_experiment(where: Path, saved: Any, current: dict[str, Any]) -> None:
    """Refuse to continue ``last/`` under a different experiment (out/quiet may differ)."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where}: no 'experiment' section (not written by alignmamba train)")
    free = {("train", "out"), ("train", "quiet")}
    for sec, values in current.items():
        for key, val in (values.items() if isinstance(values, dict) else []):
            if (sec, key) in free:
                continue
            old = saved.get(sec, {}).get(key) if isinstance(saved.get(sec), dict) else None
            if old != val:
                raise CheckpointError(f"{where}: written by a different experiment ({sec}.{key} {old!r} there, "
                                      f"{val!r} now); start a new run instead of --resume")


# ------------------------------------------------------------------ best/ and the seed directory

def stage_best(seed_dir: Path, model: nn.Module, extra: dict[str, Any], epoch: int) -> None:
    """Write the new best weights to ``.best.pending`` (committed after ``last/``)."""
    replace_dir(seed_dir / PENDING_BEST, checkpoint_files(model, {**extra, "epoch": int(epoch)}))


def commit_best(seed_dir: Path) -> None:
    """``.best.pending`` -> ``best/`` (atomically)."""
    swap_dir(seed_dir / PENDING_BEST, seed_dir / BEST)


def _epoch_of(directory: Path) -> int | None:
    try:
        meta = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
        ep = meta.get("epoch") if isinstance(meta, dict) else None
        return ep if isinstance(ep, int) else None
    except (OSError, ValueError):
        return None


def recover_seed_dir(seed_dir: Path) -> None:
    """After a kill: finish interrupted directory swaps, then commit ``.best.pending`` if
    ``last/`` already names its epoch as the best one, else drop it."""
    for name in (LAST, BEST, PENDING_BEST):
        recover_dir(seed_dir / name)
    pending = seed_dir / PENDING_BEST
    if not pending.is_dir():
        return
    best_epoch = None
    if (seed_dir / LAST).is_dir():
        try:
            best_epoch = _read_state(seed_dir / LAST)["loop"]["best_epoch"]
        except AlignMambaError:
            best_epoch = None
    if best_epoch is not None and _epoch_of(pending) == best_epoch and _epoch_of(seed_dir / BEST) != best_epoch:
        commit_best(seed_dir)
    else:
        shutil.rmtree(pending, ignore_errors=True)


def clear_seed_dir(seed_dir: Path) -> None:
    """A fresh (not resumed) seed: drop what an earlier run left (last/, best/, result.json),
    so that a later --resume never mixes two runs."""
    for name in (LAST, BEST, PENDING_BEST):
        recover_dir(seed_dir / name)
        shutil.rmtree(seed_dir / name, ignore_errors=True)
    (seed_dir / RESULT).unlink(missing_ok=True)


def read_result(seed_dir: Path, seed: int) -> dict[str, Any] | None:
    """The finished seed's record (``result.json``), or None if the seed did not finish."""
    p = seed_dir / RESULT
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"{p}: unreadable ({type(e).__name__}); delete it to train seed {seed} again") from None
    if not isinstance(rec, dict) or rec.get("seed") != seed or not isinstance(rec.get("test"), dict):
        raise CheckpointError(f"{p}: not the record of seed {seed}; delete it to train that seed again")
    return rec
