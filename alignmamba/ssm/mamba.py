"""Mamba-1 mixer block, RMSNorm and a pre-norm residual stack (SPEC section 1, "the Mamba layer").

Shapes: B batch, L time, d model width, E = expand * d inner width, N state size.
Masks are boolean (B, L), True = real token, padding at the back.

Streaming: every ``forward`` accepts ``state`` and ``return_state``. Feeding a long sequence in
consecutive pieces, passing each call's returned state to the next, gives the same outputs as
one pass over the whole sequence (the conv keeps its last d_conv-1 inputs, the scan its h).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignmamba.errors import AlignMambaError

from .causal_conv import causal_conv1d_silu
from .scan import selective_scan

MambaState = tuple[Tensor, Tensor]  # conv_state (B, E, d_conv-1), ssm_state (B, E, N)


_fused_rms_norm = getattr(F, "rms_norm", None)  # torch >= 2.4: one op (one kernel on CUDA)


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, in x's dtype (the reference)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(x.dtype)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim; computed in float32.

    Through ``F.rms_norm`` where torch has it: the same equation in one op, where
    :func:`rms_norm_ref` is six elementwise and reduction launches (a batch-1 forward is
    host-bound); tests hold the two equal.
    """

    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., d) -> (..., d) in x's dtype."""
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if _fused_rms_norm is None:
            return rms_norm_ref(xf, self.weight, self.eps).to(x.dtype)
        return _fused_rms_norm(xf, (xf.shape[-1],), self.weight.to(xf.dtype), self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _check_mask(mask: Tensor | None, x: Tensor, where: str) -> Tensor | None:
    if mask is None:
        return None
    if mask.shape != x.shape[:2]:
        raise AlignMambaError(
            f"{where}: mask must be (B, L)={tuple(x.shape[:2])}, got {tuple(mask.shape)}"
        )
    return mask.to(torch.bool)


class Mamba(nn.Module):
    """Standard Mamba-1 selective-SSM mixer (Gu and Dao 2023), as in SPEC section 1.

    in_proj -> (x, z); x: causal depthwise conv1d, SiLU; x_proj -> (dt, B, C);
    delta = softplus(dt_proj(dt) + dt_bias); y = scan(x, delta, A=-exp(A_log), B, C, D) * silu(z);
    out_proj. Initialisation: A_log = log(1..N) per channel, D = 1, dt_proj weight
    uniform(+-dt_rank^-0.5), dt bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max].
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        bias: bool = False,
        conv_bias: bool = True,
        scan_backend: str | None = None,
    ) -> None:
        super().__init__()
        for name, val in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv),
                          ("expand", expand)):
            if int(val) < 1:
                raise AlignMambaError(f"Mamba: {name} must be >= 1, got {val}")
        if not 0 < dt_min <= dt_max:
            raise AlignMambaError(f"Mamba: need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = int(expand * d_model)
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        elif not isinstance(dt_rank, int) or dt_rank < 1:
            raise AlignMambaError(f"Mamba: dt_rank must be 'auto' or an int >= 1, got {dt_rank!r}")
        self.dt_rank = dt_rank
        self.scan_backend = scan_backend
        E, N = self.d_inner, d_state

        self.in_proj = nn.Linear(d_model, 2 * E, bias=bias)
        # depthwise causal conv; applied with F.conv1d on [state | x] so streaming is exact
        self.conv1d = nn.Conv1d(E, E, kernel_size=d_conv, groups=E, bias=conv_bias,
                                padding=d_conv - 1)
        self.x_proj = nn.Linear(E, dt_rank + 2 * N, bias=False)
        self.dt_proj = nn.Linear(dt_rank, E, bias=True)
        self.out_proj = nn.Linear(E, d_model, bias=bias)

        std = dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(
            torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        # inverse of softplus: x = dt + log(1 - exp(-dt)), so softplus(x) = dt
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]

        A = torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)  # (E, N)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D = nn.Parameter(torch.ones(E))
        self.D._no_weight_decay = True  # type: ignore[attr-defined]

    def init_state(self, batch: int, device=None, dtype=None) -> MambaState:
        """Zero streaming state: conv_state (B, E, d_conv-1), ssm_state (B, E, N)."""
        w = self.in_proj.weight
        device = w.device if device is None else device
        dtype = w.dtype if dtype is None else dtype
        return (
            torch.zeros(batch, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
            torch.zeros(batch, self.d_inner, self.d_state, device=device,
                        dtype=torch.promote_types(dtype, torch.float32)),
        )

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        state: MambaState | None = None,
        return_state: bool = False,
    ) -> Tensor | tuple[Tensor, MambaState]:
        """x: (B, L, d), mask: (B, L) bool or None -> (B, L, d), zero at padded positions.

        state: (conv_state (B, E, d_conv-1), ssm_state (B, E, N)) left by the previous piece of
        the same sequence, or None to start fresh. With ``return_state`` returns (out, state).
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise AlignMambaError(
                f"Mamba: x must be (B, L, d_model={self.d_model}), got {tuple(x.shape)}"
            )
        mask = _check_mask(mask, x, "Mamba")
        bsz = x.shape[0]
        E, N = self.d_inner, self.d_state
        if state is None:
            conv_state = ssm_state = None
        else:
            conv_state, ssm_state = state
            if conv_state.shape != (bsz, E, self.d_conv - 1) or ssm_state.shape != (bsz, E, N):
                raise AlignMambaError(
                    f"Mamba: state must be ((B, {E}, {self.d_conv - 1}), (B, {E}, {N})) for "
                    f"B={bsz}, got ({tuple(conv_state.shape)}, {tuple(ssm_state.shape)})"
                )

        xz = _project_t(x, self.in_proj.weight, self.in_proj.bias)  # (B, 2E, L)
        xs, z = xz.split(E, dim=1)
        if mask is not None:
            # padding must feed zeros into the conv, whatever the encoder left there
            xs = xs * mask.unsqueeze(1).to(xs.dtype)
        # causal depthwise conv over [state | x], SiLU (a fused kernel in CUDA inference)
        xc = causal_conv1d_silu(xs, self.conv1d.weight, self.conv1d.bias, conv_state)  # (B, E, L)

        x_dbl = self.x_proj(xc.transpose(1, 2))  # (B, L, dt_rank + 2N)
        dt, Bm, Cm = x_dbl.split([self.dt_rank, N, N], dim=-1)
        delta = _project_t(dt, self.dt_proj.weight)  # (B, E, L); bias in the scan
        A = -torch.exp(self.A_log.float())
        res = selective_scan(
            xc,
            delta,
            A,
            Bm.transpose(1, 2),
            Cm.transpose(1, 2),
            D=self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            return_last_state=return_state,
            backend=self.scan_backend,
            initial_state=ssm_state,
        )
        y, last = res if return_state else (res, None)
        out = self.out_proj(y.transpose(1, 2))
        if mask is not None:
            out = out * mask.unsqueeze(-1).to(out.dtype)
        if not return_state:
            return out
        k1 = self.d_conv - 1  # the conv's inputs the next piece needs: the last k1 of [state | x]
        head = conv_state.to(xs.dtype) if conv_state is not None else xs.new_zeros(bsz, E, k1)
        new_conv = torch.cat([head, xs[:, :, max(0, xs.shape[-1] - k1):]], dim=-1)
        new_conv = new_conv[:, :, new_conv.shape[-1] - k1:]
        return out, (new_conv, last)


def _project_t(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` in the scan's layout: x (B, L, k), weight (m, k) -> (B, m, L).

    For one sequence (long-input inference) one GEMM writes (m, L) contiguous, so the scan makes
    no strided copy of the transposed view (H100, AlignMamba graphed at 64k / 256k tokens: 2.76 /
    13.15 ms against 3.21 / 14.93 ms, less memory). With a batch the view stays: one GEMM cannot
    write (B, m, L), and a batched GEMM with a broadcast weight (whose gradient is a (B, m, k)
    tensor summed over the batch) showed no gain on the MOSI-sized epoch, within its run-to-run
    noise.
    """
    if x.shape[0] == 1:
        xt = x[0].t()
        y = torch.mm(weight, xt) if bias is None else torch.addmm(bias[:, None], weight, xt)
        return y.unsqueeze(0)
    return F.linear(x, weight, bias).transpose(1, 2)


class MambaLayer(nn.Module):
    """Pre-norm residual block: x + dropout(Mamba(RMSNorm(x)))."""

    def __init__(self, d_model: int, dropout: float = 0.0, **mamba_kwargs) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model)
        self.mixer = Mamba(d_model, **mamba_kwargs)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        state: MambaState | None = None,
        return_state: bool = False,
    ) -> Tensor | tuple[Tensor, MambaState]:
        """x: (B, L, d) -> (B, L, d); state as in :meth:`Mamba.forward`."""
        res = self.mixer(self.norm(x), mask, state=state, return_state=return_state)
        h, new_state = res if return_state else (res, None)
        out = x + self.dropout(h)
        return (out, new_state) if return_state else out


class MambaStack(nn.Module):
    """n_layers MambaLayers and a final RMSNorm; outputs are zero at padded positions."""

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dropout: float = 0.0,
        scan_backend: str | None = None,
    ) -> None:
        super().__init__()
        if int(n_layers) < 1:
            raise AlignMambaError(f"MambaStack: n_layers must be >= 1, got {n_layers}")
        self.layers = nn.ModuleList(
            MambaLayer(d_model, dropout=dropout, d_state=d_state, d_conv=d_conv, expand=expand,
                       scan_backend=scan_backend)
            for _ in range(n_layers)
        )
        self.norm = RMSNorm(d_model)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        state: list[MambaState] | None = None,
        return_state: bool = False,
    ) -> Tensor | tuple[Tensor, list[MambaState]]:
        """x: (B, L, d), mask: (B, L) bool -> (B, L, d); state: one entry per layer or None."""
        mask = _check_mask(mask, x, "MambaStack")
        if state is not None and len(state) != len(self.layers):
            raise AlignMambaError(
                f"MambaStack: state has {len(state)} entries, expected {len(self.layers)} layers"
            )
        new_states: list[MambaState] = []
        for i, layer in enumerate(self.layers):
            res = layer(x, mask, state=None if state is None else state[i],
                        return_state=return_state)
            if return_state:
                x, s = res
                new_states.append(s)
            else:
                x = res
        out = self.norm(x)
        if mask is not None:
            out = out * mask.unsqueeze(-1).to(out.dtype)
        return (out, new_states) if return_state else out
