"""A restricted unpickler for feature pickles (MMSA, MulT).

``pickle.load`` on a downloaded file runs whatever callables the file names. Feature
pickles only ever need numpy arrays, dtypes and scalars inside plain containers, so
:func:`safe_load` resolves a fixed allow-list of globals and nothing else: it never
imports a module named by the file and never calls anything outside the list.

The allowed names do not resolve to numpy itself but to guards that accept only what
numpy's own pickling produces, because numpy trusts its pickles:

* ``ndarray`` is a token that only ``_reconstruct`` accepts, and ``_reconstruct`` only
  with the empty shape numpy writes (so no file can allocate from a shape alone);
* the array it returns checks its state (shape, dtype, data size, an object array's
  item count) before numpy sees it: ``ndarray.__setstate__`` crashes the interpreter
  on an object array whose list is shorter than its shape;
* ``dtype`` builds the dtype from its type string and never runs
  ``dtype.__setstate__``, which accepts inconsistent states (field offsets beyond the
  item size, wrong subarray sizes) that read out of bounds or crash. Only plain dtypes
  (bool, integers, floats, bytes, str, object, void) are accepted; structured,
  subarray and datetime dtypes are refused;
* ``set``, ``frozenset``, ``bytes``, ``bytearray`` and ``_codecs.encode`` accept only
  the arguments pickle itself writes (never ``bytearray(10**12)``).

Before unpickling, :func:`check_opcodes` walks the opcodes and refuses what the C unpickler
would allocate from a number in the file: a memo index beyond the opcodes read so far, a
payload or frame longer than the bytes left.

After loading, the guard objects are replaced by plain ndarrays and dtypes.
Every failure, hostile or merely corrupt, surfaces as a one-line
:class:`~alignmamba.errors.DataError` naming the file.
"""

from __future__ import annotations

import math
import os
import pickle
import pickletools
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

try:  # numpy >= 2 (and 1.26's forward-compat alias)
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy < 1.26
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

__all__ = ["SafeUnpickler", "check_opcodes", "safe_load"]

_REFUSED = (
    "refused to load global '{module}.{name}' "
    "(data files may only contain numpy arrays and plain containers)"
)
_PLAIN_KINDS = set("biufcSUOV")  # dtype kinds a feature file may use
_BYTE_ORDERS = ("<", ">", "|", "=")


def _bad(what: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"unexpected arguments to {what}")


class _Guard:
    """An allowed global: calls ``fn`` and refuses BUILD (pickle would otherwise set
    attributes on it through ``__dict__`` / slot state)."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise pickle.UnpicklingError("cannot modify an allowed global")

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("cannot set the state of an allowed global")


class _NdarrayToken:
    """Stands in for ``numpy.ndarray``; only ``_reconstruct`` accepts it."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("cannot set the state of numpy.ndarray")


_NDARRAY = _NdarrayToken()


class _DtypeToken:
    """A dtype under construction: built from its type string, checked against its state."""

    __slots__ = ("dtype",)

    def __init__(self, spec: Any, align: Any = False, copy: Any = False) -> None:
        if not isinstance(spec, str) or not isinstance(align, bool) or not isinstance(copy, bool):
            raise _bad("numpy dtype")
        dt = np.dtype(spec)
        if dt.kind not in _PLAIN_KINDS or dt.fields is not None or dt.subdtype is not None:
            raise pickle.UnpicklingError(f"unsupported dtype {spec!r} (only plain dtypes)")
        self.dtype = dt

    def __setstate__(self, state: Any) -> None:
        # numpy writes (3, byteorder, None, None, None, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) != 8 or state[0] != 3:
            raise _bad("numpy dtype state")
        order, subarray, names, fields, elsize, alignment = state[1:7]
        if (
            order not in _BYTE_ORDERS
            or subarray is not None
            or names is not None
            or fields is not None
        ):
            raise pickle.UnpicklingError("unsupported dtype state (only plain dtypes)")
        dt = self.dtype
        if order in "<>" and dt.byteorder != "|":
            dt = dt.newbyteorder(order)
        if elsize not in (-1, dt.itemsize) or alignment not in (-1, dt.alignment):
            raise _bad("numpy dtype state")
        self.dtype = dt


def _real_dtype(value: Any, what: str) -> np.dtype:
    if not isinstance(value, _DtypeToken):
        raise _bad(what)
    return value.dtype


class _CheckedArray(np.ndarray):
    """What ``_reconstruct`` returns: an ndarray whose state is checked before numpy sees it."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _bad("numpy array state")
        if len(state) == 5:
            if state[0] != 1:
                raise _bad("numpy array state")
            state = state[1:]
        shape, dtype, fortran, data = state
        if not isinstance(shape, tuple) or not all(type(s) is int and s >= 0 for s in shape):
            raise _bad("numpy array state")
        dt = _real_dtype(dtype, "numpy array state")
        if not isinstance(fortran, bool):
            raise _bad("numpy array state")
        size = math.prod(shape)
        if dt.hasobject:
            ok = isinstance(data, list) and len(data) == size
        else:
            # str: a Python 2 pickle read with encoding='latin1'; numpy re-encodes it
            ok = isinstance(data, (bytes, bytearray, str)) and len(data) == size * dt.itemsize
        if not ok:
            raise pickle.UnpicklingError("array data does not match its shape and dtype")
        super().__setstate__((1, shape, dt, fortran, data))


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    # numpy writes _reconstruct(ndarray, (0,), b'b') followed by BUILD with the real state.
    if subtype is not _NDARRAY or shape != (0,) or dtype not in (b"b", "b"):
        raise _bad("numpy _reconstruct")
    return _CheckedArray((0,), dtype=np.int8)


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    # Pickle protocol 5, in-band: the bytes are in the file, so their size bounds memory.
    if isinstance(buf, pickle.PickleBuffer):
        buf = buf.raw()
    dt = _real_dtype(dtype, "numpy _frombuffer")
    if not isinstance(buf, (bytes, bytearray, memoryview)) or dt.hasobject:
        raise _bad("numpy _frombuffer")
    if not isinstance(shape, tuple) or not all(type(s) is int and s >= 0 for s in shape):
        raise _bad("numpy _frombuffer")
    if order not in ("C", "F"):
        raise _bad("numpy _frombuffer")
    return np.frombuffer(buf, dtype=dt).reshape(shape, order=order)


def _scalar(dtype: Any, data: Any = None) -> Any:
    dt = _real_dtype(dtype, "numpy scalar")
    if dt.hasobject:
        return data  # what numpy's scalar() returns for the object dtype
    if isinstance(data, str):  # Python 2 pickle read with encoding='latin1'
        data = data.encode("latin1")
    if not isinstance(data, bytes) or len(data) != dt.itemsize:
        raise _bad("numpy scalar")
    return _multiarray.scalar(dt, data)


def _latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
    # Protocols 0-2 store bytes as _codecs.encode(str, 'latin1'); nothing else is allowed.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _bad("_codecs.encode")
    return text.encode("latin1")


def _container(kind: type) -> Callable[..., Any]:
    # from an already-built value only: bytearray(10**12) would allocate from one integer
    sources = (list, tuple, set, frozenset) if kind in (set, frozenset) else (bytes, bytearray)

    def build(*args: Any) -> Any:
        if len(args) > 1 or (args and not isinstance(args[0], sources)):
            raise _bad(f"builtins.{kind.__name__}")
        return kind(*args)

    return build


_ALLOWED: dict[tuple[str, str], Any] = {}
for _mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = _Guard(_reconstruct)
    _ALLOWED[(_mod, "scalar")] = _Guard(_scalar)
for _mod in ("numpy._core.numeric", "numpy.core.numeric"):
    _ALLOWED[(_mod, "_frombuffer")] = _Guard(_frombuffer)
_ALLOWED[("numpy", "ndarray")] = _NDARRAY
_ALLOWED[("numpy", "dtype")] = _Guard(_DtypeToken)
_ALLOWED[("_codecs", "encode")] = _Guard(_latin1_encode)
for _mod in ("builtins", "__builtin__"):  # protocols < 3 name the Python 2 module
    for _kind in (set, frozenset, bytes, bytearray):
        _ALLOWED[(_mod, _kind.__name__)] = _Guard(_container(_kind))
del _mod, _kind


def _finish(obj: Any, seen: dict[int, Any]) -> Any:
    """Replace guard objects by plain ndarrays / dtypes throughout the loaded structure.

    ``seen`` maps ids of visited containers to their results, so shared and recursive
    structures keep their shape and the walk terminates.
    """
    if isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return obj
    key = id(obj)
    if key in seen:
        return seen[key]
    if isinstance(obj, _DtypeToken):
        out: Any = obj.dtype
    elif isinstance(obj, np.ndarray):
        out = obj.view(np.ndarray) if type(obj) is _CheckedArray else obj
        seen[key] = out
        if out.dtype.hasobject:
            for idx in np.ndindex(out.shape):  # a full index stores an array item as one object
                item = out[idx]
                new = _finish(item, seen)
                if new is not item:
                    out[idx] = new
    elif isinstance(obj, dict):
        out = seen[key] = obj
        for k in list(obj):
            value = obj[k]
            new_key = _finish(k, seen)
            if new_key is not k:
                del obj[k]
            obj[new_key] = _finish(value, seen)
    elif isinstance(obj, list):
        out = seen[key] = obj
        for i, v in enumerate(obj):
            obj[i] = _finish(v, seen)
    elif isinstance(obj, tuple):
        out = tuple(_finish(v, seen) for v in obj)
    elif isinstance(obj, (set, frozenset)):
        out = type(obj)(_finish(v, seen) for v in obj)
    else:
        out = obj
    seen[key] = out
    return out


# Pickle stores an object once and refers to it again with a few bytes, so 2 KB of nested
# lists that each hold the previous one twice read back as 2**40 items once a loader turns
# them into an array (np.asarray, str.join): a hang or an out-of-memory kill from a file
# that names no global at all. Each item of the structure, counted once per reference,
# must therefore be paid for by the file: real feature files expand to fewer items than
# they have bytes.
_EXPANSION_PER_BYTE = 64
_EXPANSION_FLOOR = 1_000_000


def _leaf_size(obj: Any) -> int:
    if isinstance(obj, np.ndarray):
        return max(1, int(obj.size))
    if isinstance(obj, (str, bytes, bytearray)):
        return max(1, len(obj))
    return 1


def _children(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        return list(obj.flat)
    return []


def check_expansion(obj: Any, file_size: int, source: str) -> None:
    """Refuse a loaded structure whose expansion (every container and item counted once
    per reference, an array by its item count, a string by its length) exceeds
    ``64 * file_size + 10**6`` items. A reference back to an enclosing container (a cycle)
    counts as one item: the loaders refuse such values anyway. Iterative: any depth,
    O(distinct objects)."""
    limit = _EXPANSION_PER_BYTE * int(file_size) + _EXPANSION_FLOOR
    done: dict[int, int] = {}
    active: set[int] = set()
    keep: list[Any] = []  # holds temporaries (e.g. lists of object-array items) alive for id()
    stack: list[tuple[Any, list[Any] | None]] = [(obj, None)]
    while stack:
        node, kids = stack.pop()
        key = id(node)
        if kids is None:
            if key in done:
                continue
            kids = _children(node)
            if not kids:
                done[key] = _leaf_size(node)
                continue
            active.add(key)
            keep.append(kids)
            stack.append((node, kids))
            for child in kids:
                ck = id(child)
                if ck not in done and ck not in active:
                    stack.append((child, None))
            continue
        total = _leaf_size(node) + sum(done.get(id(c), 1) for c in kids)
        active.discard(key)
        if total > limit:
            raise DataError(
                f"{source}: shared references expand to more than {limit} items "
                f"(a file of {file_size} bytes); refusing a possible memory bomb"
            )
        done[key] = total


# counted payloads: the width and format of the count (pickletools' argument kinds)
_COUNTS = {pickletools.TAKEN_FROM_ARGUMENT1: struct.Struct("<B"),
           pickletools.TAKEN_FROM_ARGUMENT4: struct.Struct("<i"),
           pickletools.TAKEN_FROM_ARGUMENT4U: struct.Struct("<I"),
           pickletools.TAKEN_FROM_ARGUMENT8U: struct.Struct("<Q")}


def _check_fits(opname: str, count: int, left: int) -> None:
    if count > left:
        raise pickle.UnpicklingError(f"{opname} of {count} bytes, {left} left")


def check_opcodes(f: Any, size: int) -> None:
    """Walk the opcode stream of the open pickle ``f`` (``size`` bytes) without building
    anything, and refuse the two things the C unpickler trusts: a memo index beyond the
    opcodes read so far (pickle numbers its memo 0, 1, 2, ...; the C unpickler sizes its memo
    array by the largest index, so a 1 KB file with ``LONG_BINPUT 875835693`` made it allocate
    and zero ~14 GB) and a payload or frame longer than the bytes left (what it allocates
    before reading). Payloads are skipped, not read. Stops quietly where the stream ends or
    stops making sense, which the unpickler then reports; leaves ``f`` where it was."""
    start = f.tell()
    try:
        ops = 0
        while True:
            code = f.read(1)
            op = pickletools.code2op.get(code.decode("latin-1")) if code else None
            if op is None or op.name == "STOP":
                return
            ops += 1
            arg = op.arg
            if arg is None:
                continue
            idx = None
            if arg.n >= 0:
                raw = f.read(arg.n)
                if len(raw) < arg.n:
                    return
                if op.name in ("BINPUT", "LONG_BINPUT"):
                    idx = int.from_bytes(raw, "little")
                elif op.name == "FRAME":
                    _check_fits(op.name, int.from_bytes(raw, "little"), size - f.tell())
            elif arg.n == pickletools.UP_TO_NEWLINE:
                line = f.readline()
                if arg.name == "stringnl_noescape_pair":
                    f.readline()
                if op.name == "PUT":
                    try:
                        idx = int(line)
                    except ValueError:
                        return
            else:
                counter = _COUNTS[arg.n]
                raw = f.read(counter.size)
                if len(raw) < counter.size:
                    return
                count = counter.unpack(raw)[0]
                if count < 0:
                    return
                _check_fits(op.name, count, size - f.tell())
                f.seek(count, os.SEEK_CUR)
            if idx is not None and idx >= ops:
                raise pickle.UnpicklingError(f"{op.name} memo index {idx} after {ops} opcodes")
    finally:
        f.seek(start)


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals come only from a fixed allow-list.

    ``load()`` may return guard objects; :func:`safe_load` replaces them. Run
    :func:`check_opcodes` on the file first (as :func:`safe_load` does).
    """

    def __init__(self, file: Any, source: str) -> None:
        # latin1 lets Python 2 pickles of numpy arrays load; it only affects py2 str opcodes.
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        found = None
        if isinstance(module, str) and isinstance(name, str):
            found = _ALLOWED.get((module, name))
        if found is None:
            refused = _REFUSED.format(module=_one_line(module), name=_one_line(name))
            raise DataError(f"{self._source}: {refused}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not supported")


def _one_line(value: Any, limit: int = 200) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def safe_load(path: str | os.PathLike[str]) -> object:
    """Unpickle ``path`` allowing only numpy arrays/dtypes/scalars and plain containers.

    Raises :class:`DataError` (one line naming the file) when the file is missing, is a
    directory, is empty, truncated or not a pickle, or names any other global.
    """
    source = str(path)
    p = Path(path)
    if not p.exists():
        raise DataError(f"{source}: no such file")
    if p.is_dir():
        raise DataError(f"{source}: is a directory, expected a pickle file")
    try:
        with open(p, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise DataError(f"{source}: empty file, expected a pickle")
            size = os.fstat(f.fileno()).st_size
            check_opcodes(f, size)
            obj = _finish(SafeUnpickler(f, source).load(), {})
            check_expansion(obj, size, source)
            return obj
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"{source}: cannot read ({_one_line(exc.strerror or exc)})") from None
    except Exception as exc:  # noqa: BLE001 - any failure of a corrupt file is a data error
        # Corrupt input can make the unpickler raise nearly anything (EOFError,
        # UnpicklingError, ValueError, KeyError, MemoryError, UnicodeDecodeError, ...).
        detail = _one_line(f"{type(exc).__name__}: {exc}")
        raise DataError(
            f"{source}: not a readable pickle (truncated or corrupt: {detail})"
        ) from None
