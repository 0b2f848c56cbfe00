"""The NVRTC loader's refusals (the CUDA side runs in test_triton_scan on a GPU)."""
from __future__ import annotations

import pytest
import torch

from alignmamba.ssm import nvrtc


def test_cpu_device_is_not_available():
    ok, why = nvrtc.available(torch.device("cpu"))
    assert not ok and "not a CUDA device" in why


def test_missing_library_is_a_one_line_nvrtc_error(tmp_path):
    bogus = str(tmp_path / "libnvrtc.so.0")
    with pytest.raises(nvrtc.NvrtcError, match="NVRTC") as info:
        nvrtc.compile_cubin("__global__ void k() {}", "k", "sm_90", lib_path=bogus)
    assert "\n" not in str(info.value)


def test_kernel_arguments_are_checked_before_launch():
    k = nvrtc.Kernel(None, None, 1024)
    with pytest.raises(nvrtc.NvrtcError, match="shared memory"):
        k((1, 1, 1), 32, 4096, [], torch.device("cpu"))
    for bad in (1.5, True):  # a bool is an int to Python, not to the kernel
        with pytest.raises(TypeError, match="tensor, None or int"):
            k((1, 1, 1), 32, 0, [bad], torch.device("cpu"))


@pytest.mark.parametrize("name,kernel", [("scan_fwd.cu", "ssm_fwd"), ("scan_bwd.cu", "ssm_bwd")])
def test_kernel_source_ships_with_the_package(name, kernel):
    import importlib.resources as res

    files = res.files("alignmamba.ssm")
    assert '#include "scan_common.cuh"' in files.joinpath(name).read_text()
    assert files.joinpath("scan_common.cuh").is_file()
    src = nvrtc.read_source(name)
    # the shared helpers pasted in; nothing left for NVRTC to look up (no CUDA headers needed)
    assert kernel in src and "__device__ __forceinline__ float ex2" in src
    assert "#include" not in src


def test_read_source_pastes_package_files_only(tmp_path, monkeypatch):
    """Only a bare ``name.cuh`` next to the module is pasted; a path is left as written (and
    NVRTC, given no include path, would then refuse it)."""
    src = '#include "../evil.cuh"\n#include "scan_common.cuh"\nint k;\n'
    (tmp_path / "k.cu").write_text(src)
    (tmp_path / "scan_common.cuh").write_text("// common\n")
    monkeypatch.setattr(nvrtc, "__file__", str(tmp_path / "nvrtc.py"))
    assert nvrtc.read_source("k.cu") == '#include "../evil.cuh"\n// common\n\nint k;\n'


def test_a_missing_library_is_searched_for_once(monkeypatch):
    """Without NVRTC every backward asks again; the search (a glob over site-packages) runs once."""
    calls = []

    def no_lib(name):
        calls.append(name)
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(nvrtc, "_libs", {})
    monkeypatch.setattr(nvrtc, "_missing", {})
    monkeypatch.setattr(nvrtc.ctypes, "CDLL", no_lib)
    with pytest.raises(nvrtc.NvrtcError, match="libnvrtc"):
        nvrtc._open_nvrtc()
    searched = len(calls)
    assert searched >= 1
    for _ in range(2):
        with pytest.raises(nvrtc.NvrtcError, match="libnvrtc"):
            nvrtc._open_nvrtc()
    assert len(calls) == searched
