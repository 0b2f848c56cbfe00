"""Triton kernels in tests: compiled on a CUDA machine, through Triton's interpreter elsewhere."""
from __future__ import annotations

import importlib
import os
import types

import pytest
import torch

CUDA = torch.cuda.is_available()


def import_kernels(module: str, kernel: str) -> types.ModuleType:
    """Import ``module``, which defines the ``@triton.jit`` function ``kernel``, so that its
    kernels can run here. Without CUDA, TRITON_INTERPRET=1 must be set before Triton builds
    them, and a module imported earlier without it is reloaded. Skips the calling test module
    when Triton is not installed."""
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")
    mod = importlib.import_module(module)
    if not CUDA and type(getattr(mod, kernel)).__name__ != "InterpretedFunction":
        mod = importlib.reload(mod)
    return mod
