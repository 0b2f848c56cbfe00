"""Run-time compilation of CUDA C++ kernels with NVRTC, launched through the CUDA driver API.

Nothing is built at install time: PyTorch's CUDA wheels ship NVRTC (``libnvrtc``), the driver
ships ``libcuda``; both are reached with ctypes. A kernel is compiled once per (device, name
expression) in a process, to a cubin for the device's own architecture. Sources are files of
this package; nothing from data or checkpoints is ever compiled.

Public entry points: :func:`available` (can this device compile and launch?) and
:func:`get_kernel` (a launchable :class:`Kernel`). Failures raise :class:`NvrtcError` with a
one-line reason; callers fall back to the Triton kernels.
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import re
import sys
import threading

import torch

__all__ = ["Kernel", "NvrtcError", "available", "get_kernel", "read_source"]


class NvrtcError(RuntimeError):
    """NVRTC or the driver could not compile, load or launch a kernel."""


_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL] = {}
_kernels: dict[tuple, Kernel] = {}
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


_missing: dict[str, str] = {}  # library -> why it could not be opened (searched once)


def _open_nvrtc(path: str | None = None) -> ctypes.CDLL:
    if path is None:
        if "nvrtc" in _libs:
            return _libs["nvrtc"]
        if "nvrtc" in _missing:
            raise NvrtcError(_missing["nvrtc"])
    names = [path] if path else []
    major = (torch.version.cuda or "").split(".")[0]
    if not path:
        if major:
            names.append(f"libnvrtc.so.{major}")
        names.append("libnvrtc.so")
        # the copy in the nvidia-* wheels that PyTorch's CUDA builds depend on
        for base in sys.path:
            if base and os.path.isdir(os.path.join(base, "nvidia")):
                names += sorted(glob.glob(os.path.join(base, "nvidia", "**", "libnvrtc.so*"),
                                          recursive=True), reverse=True)
    errors = []
    for name in names:
        if "builtins" in os.path.basename(name) or ".alt." in os.path.basename(name):
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            errors.append(str(exc))
            continue
        if path is None:
            _libs["nvrtc"] = lib
        return lib
    why = "NVRTC (libnvrtc) not found: " + ("; ".join(errors[-2:]) or "no candidates")
    if path is None:
        _missing["nvrtc"] = why
    raise NvrtcError(why)


def _open_cuda() -> ctypes.CDLL:
    if "cuda" not in _libs:
        if "cuda" in _missing:
            raise NvrtcError(_missing["cuda"])
        try:
            _libs["cuda"] = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            _missing["cuda"] = f"CUDA driver (libcuda.so.1) not found: {exc}"
            raise NvrtcError(_missing["cuda"]) from None
    return _libs["cuda"]


def _check_cu(res: int, what: str) -> None:
    if res != 0:
        msg = ctypes.c_char_p()
        _open_cuda().cuGetErrorString(res, ctypes.byref(msg))
        text = msg.value.decode() if msg.value else f"error {res}"
        raise NvrtcError(f"{what}: {text}")


def compile_cubin(source: str, name_expr: str, arch: str, options: tuple[str, ...] = (),
                  lib_path: str | None = None) -> tuple[bytes, str]:
    """Compile ``source`` for ``arch`` (e.g. "sm_90"); return (cubin, lowered kernel name).

    ``name_expr`` names one kernel, a template instance included (``"k<1, true>"``).
    ``lib_path`` picks a libnvrtc explicitly (offline compiles without a GPU)."""
    nv = _open_nvrtc(lib_path)

    def check(res: int, what: str) -> None:
        if res != 0:
            nv.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise NvrtcError(f"NVRTC {what}: {nv.nvrtcGetErrorString(res).decode()}")

    prog = ctypes.c_void_p()
    check(nv.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"alignmamba.cu", 0, None,
                                None), "create")
    try:
        check(nv.nvrtcAddNameExpression(prog, name_expr.encode()), "name")
        opts = [f"--gpu-architecture={arch}", "-std=c++17", *options]
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        res = nv.nvrtcCompileProgram(prog, len(opts), arr)
        if res != 0:
            size = ctypes.c_size_t()
            nv.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nv.nvrtcGetProgramLog(prog, log)
            first = next((ln for ln in log.value.decode(errors="replace").splitlines()
                          if "error" in ln), "see the NVRTC log")
            raise NvrtcError(f"NVRTC compile of {name_expr} failed: {first.strip()}")
        size = ctypes.c_size_t()
        check(nv.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        check(nv.nvrtcGetCUBIN(prog, cubin), "cubin")
        lowered = ctypes.c_char_p()
        check(nv.nvrtcGetLoweredName(prog, name_expr.encode(), ctypes.byref(lowered)), "lowered")
        return cubin.raw, lowered.value.decode()
    finally:
        nv.nvrtcDestroyProgram(ctypes.byref(prog))


class Kernel:
    """One loaded kernel: call it with (grid, block, shared bytes, args, device); it launches
    on ``device``'s current PyTorch stream."""

    def __init__(self, func: ctypes.c_void_p, module: ctypes.c_void_p, smem_max: int):
        self._func, self._module, self._smem_max = func, module, smem_max

    def __call__(self, grid: tuple[int, int, int], block: int, smem: int, args: list,
                 device: torch.device) -> None:
        if smem > self._smem_max:
            raise NvrtcError(f"kernel needs {smem} bytes of shared memory, set for {self._smem_max}")
        # host time matters here (a launch per scan call; benchmarks/host_overhead.py): every
        # argument goes into one array of 8-byte slots, and cuLaunchKernel reads each through a
        # pointer into it (an int parameter reads the low 4 bytes of its slot: little endian)
        raw = []
        for a in args:
            if type(a) is int:
                raw.append(a & 0xFFFFFFFFFFFFFFFF)
            elif a is None:
                raw.append(0)
            elif isinstance(a, torch.Tensor):
                raw.append(a.data_ptr())
            else:
                raise TypeError(f"kernel argument {a!r}: tensor, None or int expected")
        n = len(raw)
        vals = (ctypes.c_uint64 * n)(*raw)
        base = ctypes.addressof(vals)
        params = (ctypes.c_void_p * n)(*range(base, base + 8 * n, 8))
        index = device.index if device.index is not None else torch.cuda.current_device()
        # switch devices only when needed (the context manager costs host time per launch)
        with (contextlib.nullcontext() if index == torch.cuda.current_device()
              else torch.cuda.device(index)):
            # the driver launches into this thread's current context: the device's primary
            # context must be current (a thread that has not touched CUDA gets it made current)
            _ensure_context(index)
            _check_cu(_launch_fn()(self._func, grid[0], grid[1], grid[2], block, 1, 1, smem,
                                   torch.cuda.current_stream().cuda_stream, params, None),
                      "cuLaunchKernel")


def _launch_fn():
    """cuLaunchKernel with its argument types declared (plain ints convert without wrappers)."""
    launch = _open_cuda().cuLaunchKernel
    if launch.argtypes is None:
        launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
    return launch


def _ensure_context(index: int) -> None:
    cu = _open_cuda()
    ctx = ctypes.c_void_p()
    _check_cu(cu.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    if not ctx.value:
        # PyTorch's runtime uses the device's primary context; make it current on this thread
        dev = ctypes.c_int()
        _check_cu(cu.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
        _check_cu(cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
        _check_cu(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


_INCLUDE = re.compile(r'^#include "([A-Za-z0-9_]+\.cuh)"\s*$', re.MULTILINE)


def read_source(source_file: str) -> str:
    """The package source ``source_file`` with each ``#include "name.cuh"`` line replaced by
    that package file (one level; NVRTC is given no include path, and only files next to this
    module are ever read)."""
    here = os.path.dirname(__file__)

    def text(name: str) -> str:
        with open(os.path.join(here, name), encoding="utf-8") as f:
            return f.read()

    return _INCLUDE.sub(lambda m: text(m.group(1)), text(source_file))


def get_kernel(source_file: str, name_expr: str, device: torch.device, smem_max: int,
               options: tuple[str, ...] = ()) -> Kernel:
    """The kernel ``name_expr`` of the package source ``source_file`` (a path next to this
    module), compiled for ``device`` with NVRTC ``options`` (e.g. ``-DNAME=value``) and allowed
    ``smem_max`` bytes of dynamic shared memory."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, source_file, name_expr, options)
    k = _kernels.get(key)
    if k is not None:
        return k
    with _lock:
        k = _kernels.get(key)
        if k is not None:
            return k
        major, minor = torch.cuda.get_device_capability(index)
        source = read_source(source_file)
        cubin, lowered = compile_cubin(source, name_expr, f"sm_{major}{minor}", options)
        with torch.cuda.device(index):
            _ensure_context(index)
            cu = _open_cuda()
            module, func = ctypes.c_void_p(), ctypes.c_void_p()
            _check_cu(cu.cuModuleLoadData(ctypes.byref(module), cubin), "cuModuleLoadData")
            _check_cu(cu.cuModuleGetFunction(ctypes.byref(func), module, lowered.encode()),
                      "cuModuleGetFunction")
            if smem_max > 48 * 1024:
                _check_cu(cu.cuFuncSetAttribute(
                    func, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem_max),
                    "cuFuncSetAttribute")
        k = Kernel(func, module, smem_max)
        _kernels[key] = k
        return k


def available(device: torch.device) -> tuple[bool, str]:
    """(True, "") when kernels can be compiled and launched on ``device``, else (False, why)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "not a CUDA device"
    if torch.version.hip:
        return False, "ROCm build (NVRTC is CUDA only)"
    try:
        _open_nvrtc()
        _open_cuda()
    except NvrtcError as exc:
        return False, str(exc)
    return True, ""
