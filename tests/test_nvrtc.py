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
    with pytest.raises(TypeError, match="tensor, None or int"):
        k((1, 1, 1), 32, 0, [1.5], torch.device("cpu"))


def test_kernel_source_ships_with_the_package():
    import importlib.resources as res

    src = res.files("alignmamba.ssm").joinpath("scan_bwd.cu").read_text()
    assert "ssm_bwd" in src and "#include" not in src  # NVRTC needs no CUDA headers for it


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
