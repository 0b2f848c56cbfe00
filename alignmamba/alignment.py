"""Local and global cross-modal alignment (SPEC section 1, eq. 1-10).

Local alignment is the relaxed optimal-transport plan of eq. 5: every valid source
token sends all its mass (1 / T_src) to the anchor token with the lowest cosine cost
(eq. 3). The aligned source sequence is plan^T @ src (eq. 6), one row per anchor token.
Global alignment is the squared Maximum Mean Discrepancy with a Gaussian kernel
(eq. 7-9), computed per sample over its valid tokens.

Two forms of each are kept side by side:

* the dense references (``relaxed_ot_plan``, ``mmd2_dense``): short, build the full
  (T_src x T_anchor) cost and (T x T) kernel matrices, easy to check against the paper;
* the linear-memory forms used by the model (``relaxed_ot_assign`` / ``relaxed_ot_align``,
  ``mmd2``): the argmin is found tile by tile with a running maximum of the cosine
  similarity and the aligned output is accumulated by index (scatter-add), the MMD kernel
  sums are accumulated block by block. Memory is O((T_src + T_anchor) d + tile^2) instead
  of O(T_src T_anchor). Tests hold the two forms equal.

Masks are boolean, True = real token, shape (B, T); padding sits at the back.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import env_choice, load_once, require_cuda, require_importable
from .graphs import warn_once

__all__ = [
    "cosine_cost",
    "mmd2",
    "mmd2_dense",
    "plan_from_assignment",
    "relaxed_ot_align",
    "relaxed_ot_assign",
    "relaxed_ot_plan",
    "resample_to",
    "sinkhorn_plan",
]

# Tiles of the linear-memory paths. ``tile=None`` (the default) sizes them from a fixed
# budget of TILE_BUDGET similarities per block (64 MiB in fp32, whatever the lengths):
# memory stays O((T_s + T_a) d) plus this constant, and long inputs need few blocks (each
# block is a handful of kernel launches; at 64k tokens 1024 x 1024 tiles meant thousands
# of launches and a launch-bound forward). An int gives square (tile x tile) blocks.
TILE_BUDGET = 1 << 24
DEFAULT_TILE: int | None = None

# The relaxed-OT argmax: "torch" (the tiling below), "triton" (alignmamba.ot_kernel: each
# block of similarities stays in registers), "auto" (Triton for CUDA tensors whose products
# run in bf16/fp16, i.e. under autocast, when importable; else torch: in fp32 cuBLAS's matmul
# beats the kernel's exact fp32 products, BENCHMARKS.md). The environment variable replaces
# "auto".
OT_KERNELS = ("auto", "torch", "triton")
ENV_OT_KERNEL = "ALIGNMAMBA_OT_KERNEL"
_ot_argmax_fn: list = []  # [ot_argmax or None] once the import was tried


def _load_ot_argmax():
    return load_once(_ot_argmax_fn, "alignmamba.ot_kernel", "ot_argmax")  # None: the torch tiling


def _pick_ot_kernel(kernel: str | None, device: torch.device, dtype: torch.dtype):
    """The fused argmax to call, or None for the torch tiling (``kernel``: OT_KERNELS;
    ``dtype``: the one the similarities' products run in)."""
    name, source = env_choice(kernel, OT_KERNELS, ENV_OT_KERNEL, "relaxed_ot_assign", "kernel")
    if name == "torch" or (name == "auto" and (device.type != "cuda"
                                               or dtype not in (torch.bfloat16, torch.float16))):
        return None
    fn = _load_ot_argmax()
    if name == "triton":
        require_importable(fn, "relaxed_ot_assign", source)
        require_cuda(device, "relaxed_ot_assign", source)
    elif fn is None:
        warn_once("alignmamba: fused OT argmax unavailable (Triton not importable); using the "
                  "torch tiling")
    return fn


def _matmul_dtype(t: Tensor) -> torch.dtype:
    """The dtype torch's matmul would compute ``t @ t'`` in here (autocast's, when enabled)."""
    dev = t.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (TypeError, AttributeError):  # torch < 2.4: no per-device autocast queries
        pass
    return t.dtype


def _tiles(batch: int, n: int, m: int, tile: int | None) -> tuple[int, int]:
    """Block edges (rows of n, columns of m) for ``tile`` (None: from TILE_BUDGET)."""
    if tile is not None:
        return tile, tile
    tj = max(1, min(m, TILE_BUDGET // max(1, batch)))
    return max(1, min(n, TILE_BUDGET // (max(1, batch) * tj))), tj

Bandwidth = Literal["fixed", "median", "multi"]
# Multipliers of sigma for the multi-bandwidth kernel (a sum of Gaussians, as in
# multi-kernel MMD); wide enough to cover two orders of magnitude of distances.
MULTI_SIGMA_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)


def _upcast(x: Tensor) -> Tensor:
    """Half precision inputs are computed in float32; float32/float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _full_mask(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return mask.to(device=x.device, dtype=torch.bool)


def _time_positions(mask: Tensor) -> Tensor:
    """Normalised time position in [0, 1] of every token over the valid length. (B, T)."""
    n = mask.sum(-1, keepdim=True).clamp(min=1).to(torch.float32)
    idx = torch.arange(mask.shape[-1], device=mask.device, dtype=torch.float32)
    return ((idx + 0.5) / n).clamp(max=1.0)


def cosine_cost(src: Tensor, anchor: Tensor, time_beta: float = 0.0,
                src_mask: Tensor | None = None, anchor_mask: Tensor | None = None) -> Tensor:
    """Cost matrix C(i, j) = 1 - cos(src_i, anchor_j) (eq. 3). (B, T_s, d), (B, T_a, d) -> (B, T_s, T_a).

    With ``time_beta`` > 0 the order-aware cost adds ``beta * |t_i - t_j|`` where t are
    the tokens' positions normalised by each sequence's valid length (beta = 0 is the paper).
    """
    s = F.normalize(_upcast(src), dim=-1, eps=1e-8)
    a = F.normalize(_upcast(anchor), dim=-1, eps=1e-8)
    cost = 1.0 - s @ a.transpose(1, 2)
    if time_beta:
        ts = _time_positions(_full_mask(src, src_mask))
        ta = _time_positions(_full_mask(anchor, anchor_mask))
        cost = cost + time_beta * (ts[:, :, None] - ta[:, None, :]).abs()
    return cost


@torch.no_grad()
def relaxed_ot_plan(src: Tensor, anchor: Tensor, src_mask: Tensor | None = None,
                    anchor_mask: Tensor | None = None, time_beta: float = 0.0) -> Tensor:
    """Dense relaxed OT plan of eq. 5 (the readable reference). -> (B, T_s, T_a).

    Row i of a valid source token holds 1 / len_src at argmin_j C(i, j) over valid anchor
    columns (ties: lowest index); padded rows and columns are zero. A sample without any
    valid anchor token gets an all-zero plan. The plan carries no gradient (eq. 5 is an
    argmin).
    """
    sm, am = _full_mask(src, src_mask), _full_mask(anchor, anchor_mask)
    cost = cosine_cost(src, anchor, time_beta, sm, am)
    cost = cost.masked_fill(~am[:, None, :], math.inf)
    idx = cost.argmin(dim=-1)  # first minimum on ties
    n_src = sm.sum(-1, keepdim=True).clamp(min=1).to(cost.dtype)
    valid_row = sm & am.any(-1, keepdim=True)
    mass = valid_row.to(cost.dtype) / n_src
    plan = torch.zeros_like(cost)
    plan.scatter_(-1, idx[..., None], mass[..., None])
    return plan


@torch.no_grad()
def relaxed_ot_assign(src: Tensor, anchor: Tensor, src_mask: Tensor | None = None,
                      anchor_mask: Tensor | None = None, time_beta: float = 0.0,
                      tile: int | None = DEFAULT_TILE,
                      kernel: str | None = None) -> tuple[Tensor, Tensor]:
    """The plan of eq. 5 in sparse form, in linear memory.

    Returns ``(index, weight)``, both (B, T_s): source token i sends ``weight[b, i]``
    (1 / len_src, or 0 for padding / no valid anchor) to anchor token ``index[b, i]``.
    The argmax of cosine similarity (= argmin of cost) is found over anchor tiles with a
    running maximum; a later tile wins only when strictly better, which keeps the
    lowest-index rule on ties. Never holds more than one block of similarities
    ((B, tile, tile), or TILE_BUDGET of them with ``tile=None``). ``kernel``: one of
    OT_KERNELS; "triton" runs the same argmax fused (:mod:`alignmamba.ot_kernel`, no block in
    memory at all; ``tile`` is then unused).
    """
    sm, am = _full_mask(src, src_mask), _full_mask(anchor, anchor_mask)
    B, Ts, _ = src.shape
    Ta = anchor.shape[1]
    s = F.normalize(_upcast(src), dim=-1, eps=1e-8)
    a = F.normalize(_upcast(anchor), dim=-1, eps=1e-8)
    if time_beta:
        ts_all, ta_all = _time_positions(sm), _time_positions(am)
    dt = _matmul_dtype(s)
    fused = _pick_ot_kernel(kernel, src.device, dt)
    if fused is not None:
        index = fused(s.to(dt), a.to(dt), am, ts_all if time_beta else None,
                      ta_all if time_beta else None, time_beta)
        return index, _assign_weight(sm, am, s.dtype)
    index = torch.zeros(B, Ts, dtype=torch.long, device=src.device)
    ti, tj = _tiles(B, Ts, Ta, tile)
    for i0 in range(0, Ts, ti):
        s_t = s[:, i0:i0 + ti]
        best = best_idx = None
        for j0 in range(0, Ta, tj):
            # score = -cost + 1 = cos - beta |dt|, so the argmax of score is the argmin of cost
            score = s_t @ a[:, j0:j0 + tj].transpose(1, 2)
            if time_beta:
                dt = ts_all[:, i0:i0 + ti, None] - ta_all[:, None, j0:j0 + tj]
                score.sub_(time_beta * dt.abs())
            score.masked_fill_(~am[:, None, j0:j0 + tj], -math.inf)  # a fresh block: in place
            val, arg = score.max(dim=-1)
            if best is None:
                best, best_idx = val, arg
                continue
            better = val > best
            best = torch.where(better, val, best)
            best_idx = torch.where(better, arg + j0, best_idx)
        index[:, i0:i0 + ti] = best_idx
    return index, _assign_weight(sm, am, s.dtype)


def _assign_weight(sm: Tensor, am: Tensor, dtype: torch.dtype) -> Tensor:
    """1 / len_src for valid source tokens of samples with a valid anchor token, else 0."""
    n_src = sm.sum(-1, keepdim=True).clamp(min=1).to(dtype)
    return (sm & am.any(-1, keepdim=True)).to(dtype) / n_src


def plan_from_assignment(index: Tensor, weight: Tensor, t_anchor: int) -> Tensor:
    """Dense (B, T_s, T_a) plan from the sparse ``(index, weight)`` form (for plots/tests)."""
    plan = torch.zeros(*index.shape, t_anchor, dtype=weight.dtype, device=index.device)
    return plan.scatter_(-1, index[..., None], weight[..., None])


def _add_at(out: Tensor, index: Tensor, values: Tensor, deterministic: bool | None = None) -> Tensor:
    """out[b, index[b, i]] += values[b, i], out of place. out (B, T, *f), index (B, S),
    values (B, S, *f).

    A scatter-add, whose CUDA kernel adds colliding values in whatever order its threads run;
    ``deterministic`` (None: on CUDA under ``torch.use_deterministic_algorithms``) uses an
    index-add over the flattened batch instead, which PyTorch implements deterministically
    there (same sums, fixed order)."""
    if deterministic is None:
        deterministic = out.is_cuda and torch.are_deterministic_algorithms_enabled()
    B, T = out.shape[:2]
    if not deterministic:
        idx = index.view(*index.shape, *([1] * (values.dim() - 2))).expand_as(values)
        return out.scatter_add(1, idx, values)
    flat = (index + torch.arange(B, device=index.device)[:, None] * T).reshape(-1)
    return out.reshape(B * T, *out.shape[2:]).index_add(
        0, flat, values.reshape(-1, *values.shape[2:])).view(out.shape)


def _scatter_align(src: Tensor, index: Tensor, weight: Tensor, t_anchor: int) -> Tensor:
    """out[b, index[b, i]] += weight[b, i] * src[b, i]: eq. 6 by scatter-add. -> (B, T_a, d)."""
    B, _, d = src.shape
    contrib = src * weight.to(src.dtype)[..., None]
    return _add_at(src.new_zeros(B, t_anchor, d), index, contrib)


def relaxed_ot_align(src: Tensor, anchor: Tensor, src_mask: Tensor | None = None,
                     anchor_mask: Tensor | None = None, time_beta: float = 0.0,
                     normalize: Literal["mass", "mean"] = "mass",
                     tile: int | None = DEFAULT_TILE, kernel: str | None = None) -> Tensor:
    """Aligned source X~ = plan^T @ src (eq. 6) without building the plan. -> (B, T_a, d).

    ``normalize="mass"`` is the paper: each row is the sum of the matched source tokens
    divided by len_src. ``"mean"`` divides instead by the number of tokens matched to
    that row (a barycentric average, keeping the source's scale). Anchor rows nobody
    matched are zero. Gradients reach ``src`` through the scatter-add, none reach the
    assignment (SPEC: the argmin carries no gradient), none reach ``anchor``. ``tile`` and
    ``kernel`` pick how the argmax is found (:func:`relaxed_ot_assign`).
    """
    index, weight = relaxed_ot_assign(src, anchor, src_mask, anchor_mask, time_beta, tile, kernel)
    Ta = anchor.shape[1]
    if normalize == "mean":
        counts = _add_at(torch.zeros(index.shape[0], Ta, device=src.device, dtype=weight.dtype),
                         index, (weight > 0).to(weight.dtype))
        w = (weight > 0).to(weight.dtype) / counts.gather(1, index).clamp(min=1)
        return _scatter_align(src, index, w, Ta)
    if normalize != "mass":
        raise ValueError(f"normalize must be 'mass' or 'mean', got {normalize!r}")
    return _scatter_align(src, index, weight, Ta)


def sinkhorn_plan(src: Tensor, anchor: Tensor, src_mask: Tensor | None = None,
                  anchor_mask: Tensor | None = None, eps: float = 0.05, n_iters: int = 50,
                  time_beta: float = 0.0) -> Tensor:
    """Entropic OT plan (Sinkhorn, log domain, differentiable). -> (B, T_s, T_a).

    Uniform marginals over the valid tokens (1/len_src per row, 1/len_anchor per column),
    so row sums equal the relaxed plan's. Unlike eq. 5 this plan has a gradient of its own
    with respect to both sequences. Dense: O(T_s T_a) memory, meant for the ablation.
    """
    sm, am = _full_mask(src, src_mask), _full_mask(anchor, anchor_mask)
    cost = cosine_cost(src, anchor, time_beta, sm, am)
    ns = sm.sum(-1, keepdim=True).clamp(min=1).float()
    na = am.sum(-1, keepdim=True).clamp(min=1).float()
    # A large finite negative log-weight for padding: -inf would give inf - inf = nan in
    # the updates of samples whose rows or columns are all padding.
    neg = -1e5
    log_a = torch.where(sm, -torch.log(ns), torch.full_like(sm, neg, dtype=cost.dtype))
    log_b = torch.where(am, -torch.log(na), torch.full_like(am, neg, dtype=cost.dtype))
    logk = (-cost / eps).masked_fill(~(sm[:, :, None] & am[:, None, :]), neg)
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    for _ in range(n_iters):
        f = log_a - torch.logsumexp(logk + g[:, None, :], dim=-1)
        g = log_b - torch.logsumexp(logk + f[:, :, None], dim=-2)
    plan = torch.exp(logk + f[:, :, None] + g[:, None, :])
    valid = (sm[:, :, None] & am[:, None, :]) & am.any(-1)[:, None, None]
    return plan * valid


def resample_to(src: Tensor, src_mask: Tensor | None, t_target: int,
                target_mask: Tensor | None = None) -> Tensor:
    """Adaptive average pooling of the valid source frames onto the target's time grid.

    The "no OT" ablation: target slot j (of n_t valid slots) averages source frames
    [floor(j n_s / n_t), ceil((j + 1) n_s / n_t)) of the n_s valid ones, as
    ``adaptive_avg_pool1d`` does, per sample. Linear memory (prefix sums).
    (B, T_s, d) -> (B, t_target, d); padded target slots and samples without source are zero.
    """
    B, _, d = src.shape
    sm = _full_mask(src, src_mask)
    tm = (torch.ones(B, t_target, dtype=torch.bool, device=src.device)
          if target_mask is None else target_mask.to(torch.bool))
    ns = sm.sum(-1, keepdim=True)  # (B, 1)
    nt = tm.sum(-1, keepdim=True).clamp(min=1)
    j = torch.arange(t_target, device=src.device)[None, :]
    start = torch.div(j * ns, nt, rounding_mode="floor")
    end = -torch.div(-(j + 1) * ns, nt, rounding_mode="floor")  # ceil
    start, end = torch.minimum(start, ns), torch.minimum(end, ns)  # padded slots j >= n_t
    srcz = src * sm[..., None].to(src.dtype)
    csum = torch.cat([src.new_zeros(B, 1, d), srcz.cumsum(1)], dim=1)
    total = csum.gather(1, end[..., None].expand(-1, -1, d)) - csum.gather(1, start[..., None].expand(-1, -1, d))
    count = (end - start).clamp(min=1).to(src.dtype)
    out = total / count[..., None]
    keep = tm & (ns > 0) & (end > start)
    return out * keep[..., None].to(src.dtype)


# ---------------------------------------------------------------------------- MMD

def _sq_dists(x: Tensor, y: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances (B, n, m), clamped at 0 against rounding."""
    xx = (x * x).sum(-1)
    yy = (y * y).sum(-1)
    return (xx[:, :, None] + yy[:, None, :] - 2.0 * (x @ y.transpose(1, 2))).clamp(min=0.0)


def _gauss(d2: Tensor, sigma: Tensor, bandwidth: str) -> Tensor:
    """Gaussian kernel of eq. 9 from squared distances; sigma is (B,) per sample."""
    s2 = (sigma * sigma)[:, None, None]
    if bandwidth == "multi":
        return sum(torch.exp(-d2 / (2.0 * c * c * s2)) for c in MULTI_SIGMA_SCALES) / len(MULTI_SIGMA_SCALES)
    return torch.exp(-d2 / (2.0 * s2))


def _nanmedian_rows(v: Tensor) -> Tensor:
    """``torch.nanmedian(v, dim=1).values`` (the lower median of each row's non-NaN values; NaN
    for a row without any) by a sort, which CUDA has deterministically: nanmedian with indices
    has no deterministic CUDA kernel and raises under torch.use_deterministic_algorithms."""
    count = (~torch.isnan(v)).sum(1, keepdim=True)
    ranked = torch.sort(v, dim=1).values  # NaN sorts last
    med = ranked.gather(1, ((count - 1).clamp(min=0) // 2)).squeeze(1)
    return med.masked_fill(count.squeeze(1) == 0, math.nan)


@torch.no_grad()
def _median_sigma(x: Tensor, y: Tensor, xm: Tensor, ym: Tensor, max_points: int = 512) -> Tensor:
    """Median heuristic: sigma^2 = median(||z - z'||^2) / 2 over the pooled valid tokens. (B,).

    Uses at most ``max_points`` tokens of each set (evenly strided) so it stays linear.
    """
    def sub(z: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
        step = max(1, math.ceil(z.shape[1] / max_points))
        return z[:, ::step], m[:, ::step]
    xs, xms = sub(x, xm)
    ys, yms = sub(y, ym)
    z = torch.cat([xs, ys], 1)
    zm = torch.cat([xms, yms], 1)
    d2 = _sq_dists(z, z)
    pair = zm[:, :, None] & zm[:, None, :]
    pair = pair & ~torch.eye(z.shape[1], dtype=torch.bool, device=z.device)[None]
    d2 = d2.masked_fill(~pair, math.nan)
    med = torch.nan_to_num(_nanmedian_rows(d2.flatten(1)), nan=2.0)
    return torch.sqrt(med.clamp(min=1e-6) / 2.0)


def _sigma_vector(x: Tensor, y: Tensor, xm: Tensor, ym: Tensor, sigma: float,
                  bandwidth: str) -> Tensor:
    if bandwidth not in ("fixed", "median", "multi"):
        raise ValueError(f"bandwidth must be 'fixed', 'median' or 'multi', got {bandwidth!r}")
    if bandwidth == "median":
        return _median_sigma(x, y, xm, ym)
    return torch.full((x.shape[0],), float(sigma), device=x.device, dtype=x.dtype)


def _pair_mean(k: Tensor, m1: Tensor, m2: Tensor) -> Tensor:
    w = m1[:, :, None] & m2[:, None, :]
    return (k * w).sum((1, 2)) / w.sum((1, 2)).clamp(min=1)


def mmd2_dense(x: Tensor, y: Tensor, sigma: float = 1.0, x_mask: Tensor | None = None,
               y_mask: Tensor | None = None, bandwidth: Bandwidth = "fixed") -> Tensor:
    """Squared MMD (eq. 8) with the Gaussian kernel (eq. 9), dense reference. -> (B,).

    MMD^2 = mean k(x_i, x_i') + mean k(y_j, y_j') - 2 mean k(x_i, y_j), means over the
    valid tokens of each sample (the biased V-statistic, diagonal included). A sample in
    which either set is empty gets 0.
    """
    xm, ym = _full_mask(x, x_mask), _full_mask(y, y_mask)
    xf, yf = _upcast(x), _upcast(y)
    sig = _sigma_vector(xf, yf, xm, ym, sigma, bandwidth)
    kxx = _pair_mean(_gauss(_sq_dists(xf, xf), sig, bandwidth), xm, xm)
    kyy = _pair_mean(_gauss(_sq_dists(yf, yf), sig, bandwidth), ym, ym)
    kxy = _pair_mean(_gauss(_sq_dists(xf, yf), sig, bandwidth), xm, ym)
    both = xm.any(-1) & ym.any(-1)
    return (kxx + kyy - 2.0 * kxy) * both.to(kxx.dtype)


def _blockwise_kernel_mean(a: Tensor, am: Tensor, b: Tensor, bm: Tensor, sig: Tensor,
                           bandwidth: str, tile: int | None) -> Tensor:
    """Mean of k(a_i, b_j) over valid pairs, accumulated over blocks (see _tiles). (B,)."""
    total = a.new_zeros(a.shape[0])
    ti, tj = _tiles(a.shape[0], a.shape[1], b.shape[1], tile)
    for i0 in range(0, a.shape[1], ti):
        a_t, am_t = a[:, i0:i0 + ti], am[:, i0:i0 + ti]
        for j0 in range(0, b.shape[1], tj):
            b_t, bm_t = b[:, j0:j0 + tj], bm[:, j0:j0 + tj]
            k = _gauss(_sq_dists(a_t, b_t), sig, bandwidth)
            total = total + (k * (am_t[:, :, None] & bm_t[:, None, :])).sum((1, 2))
    n = am.sum(-1).to(a.dtype) * bm.sum(-1).to(a.dtype)
    return total / n.clamp(min=1)


def mmd2(x: Tensor, y: Tensor, sigma: float = 1.0, x_mask: Tensor | None = None,
         y_mask: Tensor | None = None, bandwidth: Bandwidth = "fixed",
         tile: int | None = DEFAULT_TILE) -> Tensor:
    """Squared MMD of eq. 8 per sample, blockwise (linear memory). (B, T_x, d), (B, T_y, d) -> (B,).

    Same value as :func:`mmd2_dense`; kernel blocks of at most (tile x tile), or of
    TILE_BUDGET entries with ``tile=None``, are formed and reduced at once. ``bandwidth``: "fixed" (the paper's single sigma), "median"
    (sigma from the median heuristic per sample, no gradient through it) or "multi"
    (average of Gaussians at sigma times MULTI_SIGMA_SCALES).
    """
    xm, ym = _full_mask(x, x_mask), _full_mask(y, y_mask)
    xf, yf = _upcast(x), _upcast(y)
    sig = _sigma_vector(xf, yf, xm, ym, sigma, bandwidth)
    kxx = _blockwise_kernel_mean(xf, xm, xf, xm, sig, bandwidth, tile)
    kyy = _blockwise_kernel_mean(yf, ym, yf, ym, sig, bandwidth, tile)
    kxy = _blockwise_kernel_mean(xf, xm, yf, ym, sig, bandwidth, tile)
    both = xm.any(-1) & ym.any(-1)
    return (kxx + kyy - 2.0 * kxy) * both.to(kxx.dtype)
