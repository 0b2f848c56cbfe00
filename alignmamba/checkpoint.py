"""Checkpoints: config as JSON plus weights as safetensors, written atomically.

A checkpoint directory holds ``config.json`` (the model's :class:`AlignMambaConfig`,
plus optional extra metadata such as the resolved experiment config) and
``model.safetensors``. Loading never unpickles anything: the config is parsed strictly,
the model is rebuilt from it and every tensor's name and shape is checked against the
freshly built model before use.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .config import from_dict, to_dict
from .errors import AlignMambaError, CheckpointError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_checkpoint(model: nn.Module, directory: str | os.PathLike, extra: dict | None = None) -> None:
    """Save ``model.config`` and its weights into ``directory`` (weights first, config last,
    so a directory with a config.json always has matching weights)."""
    from safetensors.torch import save

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(d / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
    payload = {"model": to_dict(model.config)}  # type: ignore[attr-defined]
    if extra:
        payload.update(extra)
    atomic_write_json(d / CONFIG_NAME, payload)


def read_checkpoint_config(directory: str | os.PathLike) -> dict:
    """The parsed config.json of a checkpoint directory (raises CheckpointError)."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: checkpoint directory not found")
    p = d / CONFIG_NAME
    if not p.is_file():
        raise CheckpointError(f"{p}: missing (not a checkpoint directory)")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: invalid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{p}: no 'model' section")
    return data


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model from config.json and load model.safetensors, validating both."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .model import AlignMambaConfig, build_model

    d = Path(directory)
    data = read_checkpoint_config(d)
    try:
        cfg = from_dict(AlignMambaConfig, data["model"], f"{d / CONFIG_NAME}: model")
    except AlignMambaError as e:
        raise CheckpointError(str(e)) from None
    model = build_model(cfg)
    wpath = d / WEIGHTS_NAME
    if not wpath.is_file():
        raise CheckpointError(f"{wpath}: missing")
    try:
        state = load_file(str(wpath), device=str(map_location))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{wpath}: unreadable safetensors file ({str(e).splitlines()[0]})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{wpath}: missing tensor '{missing[0]}' for model '{cfg.model}'")
    if unexpected:
        raise CheckpointError(f"{wpath}: unexpected tensor '{unexpected[0]}' for model '{cfg.model}'")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{wpath}: tensor '{k}' has shape {tuple(state[k].shape)}, "
                                  f"config.json implies {tuple(v.shape)}")
    model.load_state_dict(state)
    return model.to(map_location)
