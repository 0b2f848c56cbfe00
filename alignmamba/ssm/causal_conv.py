"""The Mamba layer's causal depthwise convolution followed by SiLU, with an inference kernel.

``y[b, e, t] = silu(bias[e] + sum_k w[e, k] * x'[b, e, t + k])`` for k = 0..K-1, where
``x' = [state | x]`` along time: the K-1 inputs before the first step come from ``state``
(the previous piece of a streamed sequence) or are zero.

:func:`causal_conv1d_silu_ref` is the plain PyTorch form (``F.conv1d`` on the concatenation,
then ``F.silu``), used for training and wherever the kernel is not. The Triton kernel reads x
and state in place and writes y once: one launch instead of a concatenation, PyTorch's
depthwise convolution (58 us per layer at 64k tokens on an H100, ~20% of the bandwidth it
should take) and a SiLU pass. It has no backward, so it runs only when no gradient is needed
(inference), on CUDA, with Triton importable (``conv_kernel.py``); ``kernel=`` or ``ALIGNMAMBA_CONV_KERNEL``
(auto | torch | triton) chooses. It sums in fp32 and rounds once to x's dtype, where the
reference under autocast rounds the products' sum and the SiLU separately in bf16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import env_choice, load_once, require_cuda, require_importable
from ..errors import AlignMambaError
from ..graphs import warn_once

__all__ = ["CONV_KERNELS", "ENV_CONV_KERNEL", "causal_conv1d_silu", "causal_conv1d_silu_ref"]

CONV_KERNELS = ("auto", "torch", "triton")
ENV_CONV_KERNEL = "ALIGNMAMBA_CONV_KERNEL"
_kernel_fn: list = []  # [the Triton launcher or None] once the import was tried


def causal_conv1d_silu_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                           state: Tensor | None = None) -> Tensor:
    """x: (B, E, L); weight: (E, 1, K) (``nn.Conv1d(E, E, K, groups=E).weight``); bias: (E,);
    state: (B, E, K-1) or None (zeros) -> (B, E, L)."""
    k = weight.shape[-1]
    if state is None:
        state = x.new_zeros(x.shape[0], x.shape[1], k - 1)
    conv_in = torch.cat([state.to(x.dtype), x], dim=-1)  # (B, E, K-1+L)
    return F.silu(F.conv1d(conv_in, weight, bias, groups=x.shape[1]))


def _load_kernel():
    return load_once(_kernel_fn, "alignmamba.ssm.conv_kernel", "conv1d_silu")  # None: F.conv1d


def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                       state: Tensor | None = None, kernel: str | None = None) -> Tensor:
    """:func:`causal_conv1d_silu_ref`'s result, through the Triton kernel where it applies.

    ``kernel``: CONV_KERNELS (None = "auto", which the environment variable replaces): "auto"
    takes the kernel for CUDA tensors when no gradient is needed and Triton is importable.
    """
    name, source = env_choice(kernel, CONV_KERNELS, ENV_CONV_KERNEL, "causal_conv1d_silu",
                              "kernel")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, state))
    if name == "torch" or (name == "auto" and (x.device.type != "cuda" or needs_grad)):
        return causal_conv1d_silu_ref(x, weight, bias, state)
    fn = _load_kernel()
    if name == "triton":
        require_importable(fn, "causal_conv1d_silu", source)
        if needs_grad:
            raise AlignMambaError(f"causal_conv1d_silu: {source}='triton' has no backward; "
                                  "use 'torch' (or 'auto') where gradients are needed")
        require_cuda(x.device, "causal_conv1d_silu", source)
    elif fn is None:
        warn_once("alignmamba: fused causal conv unavailable (Triton not importable); using "
                  "F.conv1d")
        return causal_conv1d_silu_ref(x, weight, bias, state)
    return fn(x, weight, bias, state)
