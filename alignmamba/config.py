"""Typed, strict configuration: dataclasses, YAML/JSON files and dotted overrides.

Every thing that has settings owns one dataclass (``AlignMambaConfig`` in
``model.py``, ``DataConfig``/``OptimConfig``/``TrainConfig`` in ``train.py``).
This module only knows how to fill dataclasses from plain dicts and from
``section.key=value`` strings (torchtune style): an unknown key or a value of
the wrong type is a :class:`ConfigError`, never silently ignored.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from .errors import AlignMambaError, ConfigError

T = TypeVar("T")

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) < len(get_args(tp)):
            inner = args[0] if len(args) == 1 else Union[tuple(args)]  # type: ignore[index]  # noqa: UP007 (built from a run-time tuple)
            return True, inner
    return False, tp


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML/JSON or a CLI string) to type ``tp`` or raise.

    Strings are parsed (``"3"`` -> 3 for an int field, ``"a,b"`` -> ["a", "b"] for a
    list field, ``"none"`` -> None for an optional field); other values must already
    have the right type (an int is accepted where a float is expected).
    """
    optional, inner = _is_optional(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{where}: None is not allowed (expected {_type_name(tp)})")
    tp = inner
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        args = get_args(tp)
        elem = args[0] if args else Any
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        out = [coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {coerce(k, kt, where): coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: cannot use {value!r} as {_type_name(tp)}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {k: coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """A JSON-ready dict of a (nested) dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(obj: T, overrides: list[str] | None) -> T:
    """Return a copy of dataclass ``obj`` with ``a.b.c=value`` overrides applied.

    The path must name an existing field; the value is parsed for that field's type.
    """
    if not overrides:
        return obj
    data = to_dict(obj)
    cls = type(obj)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        node, node_cls = data, cls
        for i, part in enumerate(parts):
            hints = _hints(node_cls) if dataclasses.is_dataclass(node_cls) else {}
            if part not in hints:
                known = ", ".join(sorted(hints)) if hints else "(not a section)"
                raise ConfigError(f"--set {key}: unknown key '{part}' (known: {known})")
            if i == len(parts) - 1:
                tp = hints[part]
                if dataclasses.is_dataclass(_is_optional(tp)[1]):
                    raise ConfigError(f"--set {key}: is a section, name one of its keys")
                node[part] = to_dict(coerce(_parse_scalar(raw, tp), tp, f"--set {key}"))
            else:
                _, sub = _is_optional(hints[part])
                if not dataclasses.is_dataclass(sub):
                    raise ConfigError(f"--set {key}: '{part}' is not a section")
                node, node_cls = node[part], sub
    return from_dict(cls, data)


def _parse_scalar(raw: str, tp: Any) -> Any:
    """Parse JSON-looking override values (lists, numbers) but keep plain strings."""
    raw = raw.strip()
    if raw.startswith(("[", "{")):
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"cannot parse {raw!r}: {e.msg}") from None
    return raw


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file into a dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{p}: reading YAML needs PyYAML (pip install pyyaml)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def merge_dicts(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update (update wins); used to layer preset <- file <- overrides."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = v
    return out


def env_choice(value: str | None, choices: Sequence[str], env: str, where: str,
               arg: str) -> tuple[str, str]:
    """(name, where it came from) of a kernel or backend choice: ``value`` (None = "auto"),
    which the environment variable ``env`` replaces when it is "auto" and the variable is set.
    A name not in ``choices`` is a one-line error naming ``arg`` or ``env``."""
    name, source = ("auto" if value is None else str(value)), arg
    if name == "auto":
        from_env = os.environ.get(env, "").strip()
        if from_env:
            name, source = from_env, env
    if name not in choices:
        raise AlignMambaError(f"{where}: {source}={name!r} is not one of {', '.join(choices)}")
    return name, source


def load_once(cache: list, module: str, name: str) -> Any:
    """``module.name`` (an optional kernel's launcher), imported on first use and kept in
    ``cache`` (a list, empty until then); None when it cannot be imported (no usable Triton)."""
    if not cache:
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, RuntimeError, OSError):
            fn = None
        cache.append(fn)
    return cache[0]


def require_importable(fn: Any, where: str, source: str) -> None:
    """A kernel choice forced to "triton" (by ``source``) needs its launcher ``fn``."""
    if fn is None:
        raise AlignMambaError(f"{where}: {source}='triton' but Triton is not importable; "
                              "use 'torch'")


def require_cuda(device: Any, where: str, source: str) -> None:
    """A kernel choice forced to "triton" needs CUDA tensors, unless Triton's interpreter is on
    (TRITON_INTERPRET=1, the CPU tests)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise AlignMambaError(f"{where}: {source}='triton' needs CUDA tensors, got device {device}")
