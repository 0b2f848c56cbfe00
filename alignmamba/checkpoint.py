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
from torch import nn

from .config import from_dict, to_dict
from .errors import AlignMambaError, CheckpointError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 & ~umask)
        os.fchmod(fd, 0o666 & ~_umask())
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


def checkpoint_files(model: nn.Module, extra: dict | None = None) -> dict[str, bytes]:
    """The two files of a checkpoint: ``{"model.safetensors": ..., "config.json": ...}``."""
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    payload = {"model": to_dict(model.config)}  # type: ignore[attr-defined]
    if extra:
        payload.update(extra)
    text = json.dumps(payload, indent=2, default=_json_default) + "\n"
    return {WEIGHTS_NAME: save(state, metadata={"format": "pt"}), CONFIG_NAME: text.encode("utf-8")}


def save_checkpoint(model: nn.Module, directory: str | os.PathLike, extra: dict | None = None) -> None:
    """Save ``model.config`` and its weights into ``directory`` (weights first, config last,
    so a directory with a config.json always has matching weights). Other files in
    ``directory`` are left alone; :func:`replace_dir` swaps in a whole directory instead."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = checkpoint_files(model, extra)
    atomic_write_bytes(d / WEIGHTS_NAME, files[WEIGHTS_NAME])
    atomic_write_bytes(d / CONFIG_NAME, files[CONFIG_NAME])


def _fsync_dir(path: Path) -> None:
    # makes a rename durable across a power cut; a plain kill never needs it
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _old_dir(d: Path) -> Path:
    return d.parent / f".{d.name}.old"


def replace_dir(directory: str | os.PathLike, files: dict[str, bytes]) -> None:
    """Make ``directory`` hold exactly ``files`` (name -> content), all or nothing.

    The files go into a temporary sibling directory first, which then takes the place of
    ``directory`` by two renames (old -> ``.<name>.old``, new -> ``<name>``). A kill at any
    point leaves either the complete old directory, the complete new one, or (between the
    two renames) the complete old one under ``.<name>.old``, which :func:`recover_dir` puts
    back. Never a half-written checkpoint.
    """
    import shutil

    d = Path(directory)
    d.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(d)
    tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=f".{d.name}.", suffix=".tmp"))
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        swap_dir(tmp, d)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_dir(src: str | os.PathLike, directory: str | os.PathLike) -> None:
    """Move the complete directory ``src`` to ``directory``, replacing it (see :func:`replace_dir`)."""
    import shutil

    src, d = Path(src), Path(directory)
    _restore_old(d)
    old = _old_dir(d)
    if d.exists():
        os.rename(d, old)
    os.rename(src, d)
    _fsync_dir(d.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(directory: str | os.PathLike) -> bool:
    """Undo what a kill inside :func:`replace_dir` left: put ``.<name>.old`` back when
    ``<name>`` is gone, drop stale temporaries. True when something was put back."""
    import shutil

    d = Path(directory)
    restored = _restore_old(d)
    if d.parent.is_dir():
        for stale in d.parent.glob(f".{d.name}.*.tmp"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
    return restored


def _restore_old(d: Path) -> bool:
    import shutil

    old = _old_dir(d)
    if not old.is_dir():
        return False
    if d.exists():
        shutil.rmtree(old, ignore_errors=True)
        return False
    os.rename(old, d)
    return True


def read_checkpoint_config(directory: str | os.PathLike) -> dict:
    """The parsed config.json of a checkpoint directory (raises CheckpointError)."""
    d = Path(directory)
    if not d.is_dir():
        hint = (f" (a save was interrupted: {_old_dir(d)} holds the previous one)"
                if _old_dir(d).is_dir() else "")
        raise CheckpointError(f"{d}: checkpoint directory not found{hint}")
    p = d / CONFIG_NAME
    if not p.is_file():
        raise CheckpointError(f"{p}: missing (not a checkpoint directory)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: invalid JSON ({str(e).splitlines()[0]})") from None
    except (OSError, RecursionError) as e:
        raise CheckpointError(f"{p}: cannot read ({type(e).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{p}: no 'model' section")
    return data


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model from config.json and load model.safetensors, validating both."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from .model import AlignMambaConfig, build_model

    d = Path(directory)
    data = read_checkpoint_config(d)
    cpath = d / CONFIG_NAME
    try:
        cfg = from_dict(AlignMambaConfig, data["model"], f"{cpath}: model")
    except AlignMambaError as e:
        raise CheckpointError(_naming(cpath, e)) from None
    wpath = d / WEIGHTS_NAME
    if not wpath.is_file():
        raise CheckpointError(f"{wpath}: missing")
    # Names and shapes from the file's header against a model built on the meta device:
    # a config.json with absurd sizes is refused before anything is allocated.
    try:
        with safe_open(str(wpath), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{wpath}: unreadable safetensors file ({_first_line(e)})") from None
    try:
        # twice the file's tensors and some: transformers' BertModel registers some parameters
        # twice while it builds (121 registrations for 84 tensors in the tests' tiny BERT)
        expected = _expected_shapes(cfg, build_model, max_params=2 * len(stored) + 64)
    except AlignMambaError as e:
        raise CheckpointError(_naming(cpath, e)) from None
    except (RuntimeError, ValueError, OverflowError, MemoryError) as e:  # e.g. sizes overflowing int64
        raise CheckpointError(f"{cpath}: the model it describes cannot be built ({_first_line(e)})") from None
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing:
        raise CheckpointError(f"{wpath}: missing tensor '{missing[0]}' for model '{cfg.model}'")
    if unexpected:
        raise CheckpointError(f"{wpath}: unexpected tensor '{unexpected[0]}' for model '{cfg.model}'")
    for k, shape in expected.items():
        if stored[k] != shape:
            raise CheckpointError(f"{wpath}: tensor '{k}' has shape {stored[k]}, config.json implies {shape}")
    try:
        state = load_file(str(wpath), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{wpath}: unreadable safetensors file ({_first_line(e)})") from None
    for k, v in state.items():
        # a flipped bit in the data region is not detected by the format; inf/NaN weights are
        # the symptom that matters (training never saves them)
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{wpath}: tensor '{k}' holds inf/NaN values (corrupted file?)")
    model = build_model(cfg)
    model.load_state_dict(state)
    return model.to(map_location)


def _expected_shapes(cfg: Any, build_model: Any,
                     max_params: int | None = None) -> dict[str, tuple[int, ...]]:
    """Parameter/buffer shapes of the model ``cfg`` describes, built on the meta device
    (no memory). A failure there is the caller's error: building for real instead (as this
    did once) turned ``d_model = 10**9`` into allocations that, where the memory allowed
    them, ran until a 128 GB host killed the process.

    ``max_params``: the build stops with a CheckpointError once it has registered more
    parameters than that (the caller's bound from the file's tensor count): construction time
    grows with the number of modules, and ``n_layers = 10**6`` would take about an hour even on
    the meta device."""
    registered = 0

    def count(module: nn.Module, name: str, param: Any) -> None:
        nonlocal registered
        registered += param is not None
        if max_params is not None and registered > max_params:
            raise CheckpointError(f"the model it describes registers more than {max_params} "
                                  "parameters, far more than the weights file holds")

    handle = nn.modules.module.register_module_parameter_registration_hook(count)
    try:
        with torch.device("meta"):
            model = build_model(cfg)
    finally:
        handle.remove()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _naming(path: Path, e: BaseException) -> str:
    """``e``'s message, prefixed with ``path`` unless it already names it."""
    msg = _first_line(e)
    return msg if str(path) in msg else f"{path}: {msg}"
