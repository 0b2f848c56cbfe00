"""Baselines sharing AlignMamba's data path, trainer and metrics (SPEC section 4).

The paper compares AlignMamba with a single-stream and a multi-stream Transformer (its
efficiency figure) and with naive single-/multi-stream Mamba fusion (its ablation). All
four take the same :class:`~alignmamba.model.AlignMambaConfig`, the same unimodal
encoders (step 1) and return the same :class:`~alignmamba.model.ModelOutput` (with
``align_loss`` = 0 and no plans: there is no alignment here).

* ``transformer_single``: all modalities' valid tokens one after the other, packed (valid
  tokens first, padding at the back), each token = encoding + modality embedding +
  sinusoidal position within its modality -> pre-norm Transformer layers -> pool -> head.
* ``transformer_multi``: MulT-style. For every target modality t and every other source s,
  a stack of cross-modal layers (queries from t, keys/values from s); the streams of one
  target are concatenated, projected to d and run through a self-attention "memory" stack;
  the pooled targets are concatenated -> head.
* ``mamba_single``: the packed concatenated sequence through one MambaStack.
* ``mamba_multi``: one MambaStack per modality, pooled, concatenated -> head.

Attention is ``torch.nn.functional.scaled_dot_product_attention`` so PyTorch's fused
kernels (flash / memory-efficient) run where available; when no token of the batch is
padding the mask is dropped entirely, which lets SDPA pick the flash kernel.

Missing modalities (``present``): an absent modality's tokens are masked out. Single-stream
models simply see fewer tokens; multi-stream models replace the pooled vector of an absent
modality by a learned "missing" vector, and a cross-modal update from an absent source is
zero. A sample with every modality absent pools to zero (no NaN anywhere).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .model import (
    AlignMambaConfig,
    ModelOutput,
    PretrainedMixin,
    UnimodalEncoder,
    masked_pool,
    pack_valid,
    prediction_head,
    register_model,
)

__all__ = [
    "MambaMulti",
    "MambaSingle",
    "TransformerMulti",
    "TransformerSingle",
    "sinusoidal_positions",
]


# ------------------------------------------------------------------ shared pieces

def sinusoidal_positions(t: int, d: int, device: torch.device | None = None,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """Fixed sine/cosine position codes (Vaswani et al.) for positions 0..t-1. -> (t, d).

    Fixed rather than learned so any length works (the benchmark goes to 64k tokens).
    """
    pos = torch.arange(t, device=device, dtype=torch.float32)[:, None]
    half = (d + 1) // 2
    freq = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * (-math.log(10000.0) / half))
    ang = pos * freq[None, :]
    out = torch.stack([ang.sin(), ang.cos()], dim=-1).flatten(1)[:, :d]  # interleaved sin, cos
    return out.to(dtype)


def _encode(model: nn.Module, features: dict[str, Tensor], masks: dict[str, Tensor] | None,
            present: Tensor | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Step 1 for every modality with absent modalities masked out.

    Returns encodings {m: (B, T_m, d)} (zero at padding / absent) and masks {m: (B, T_m)}
    (False at padding and for every token of a modality absent from that sample).
    """
    cfg: AlignMambaConfig = model.config
    ref = features[cfg.modalities[0]]
    dtype = next(model.parameters()).dtype
    out_masks: dict[str, Tensor] = {}
    h: dict[str, Tensor] = {}
    for i, m in enumerate(cfg.modalities):
        if masks is not None and m in masks:
            mk = masks[m].to(device=ref.device, dtype=torch.bool)
        else:
            mk = torch.ones(features[m].shape[:2], dtype=torch.bool, device=ref.device)
        if present is not None:
            mk = mk & present[:, i].to(device=ref.device, dtype=torch.bool)[:, None]
        out_masks[m] = mk
        h[m] = model.encoders[m](features[m].to(dtype), mk)
    return h, out_masks


def _no_padding(masks: dict[str, Tensor] | None, present: Tensor | None) -> bool:
    """No masks and no missing modalities given: every token is real, known statically."""
    return not masks and present is None


def _finish(cfg: AlignMambaConfig, pred: Tensor) -> ModelOutput:
    pred = pred.squeeze(-1) if cfg.task == "regression" else pred
    return ModelOutput(pred=pred, align_loss=pred.new_zeros(()), plans=None)


def _packed_sequence(cfg: AlignMambaConfig, h: dict[str, Tensor], masks: dict[str, Tensor],
                     add: dict[str, Tensor], full: bool = False) -> tuple[Tensor, Tensor]:
    """Concatenate the modalities in ``cfg.interleave_order`` (the order of AlignMamba's fused
    sequence), add ``add[m]`` ((T_m, d) or (d,)) to real tokens, move valid tokens to the
    front and cut the all-padding tail. -> (B, T, d), (B, T) with T = longest valid total.
    ``full``: the caller knows there is no padding (no host sync, capturable in a CUDA graph)."""
    xs, ms = [], []
    for m in cfg.interleave_order:
        mk = masks[m][..., None].to(h[m].dtype)
        xs.append((h[m] + add[m].to(h[m].dtype)) * mk)
        ms.append(masks[m])
    if full:
        return torch.cat(xs, 1), torch.cat(ms, 1)
    x, mask = pack_valid(torch.cat(xs, 1), torch.cat(ms, 1))
    # Padding-only columns at the back do no useful work; at least one column keeps shapes valid.
    n = max(1, int(mask.sum(1).max()))
    return x[:, :n], mask[:, :n]


def _key_mask(mask: Tensor, full: bool = False) -> tuple[Tensor | None, Tensor]:
    """SDPA boolean mask (B, 1, 1, T) for keys, or None when nothing is padding (``full``:
    known without looking, so without a host sync).

    A sample without any valid key would make the softmax 0/0 = NaN; its keys are all
    switched on instead (its outputs are never used: pooling and the cross-modal gate
    drop them). Also returns ``has`` (B,): the sample has at least one valid token.
    """
    has = mask.any(1)
    if full or bool(mask.all()):
        return None, has  # no mask at all lets SDPA use the flash kernel
    safe = mask | ~has[:, None]
    return safe[:, None, None, :], has


def _wide_head(d_in: int, d: int, out_dim: int, dropout: float) -> nn.Module:
    """Head over several pooled streams concatenated (d_in = M d)."""
    return nn.Sequential(nn.Linear(d_in, d), nn.GELU(), nn.Dropout(dropout), nn.Linear(d, out_dim))


def _check_heads(cfg: AlignMambaConfig) -> None:
    if cfg.d_model % cfg.n_heads:
        raise ConfigError(f"model.n_heads: d_model {cfg.d_model} is not divisible by n_heads {cfg.n_heads}")


class Attention(nn.Module):
    """Multi-head attention through ``scaled_dot_product_attention``.

    forward(x (B, Tq, d), ctx (B, Tk, d), attn_mask (B, 1, 1, Tk) bool or None) -> (B, Tq, d)
    """

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.h = n_heads
        self.p = dropout
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: Tensor, ctx: Tensor, attn_mask: Tensor | None) -> Tensor:
        B, Tq, d = x.shape
        Tk = ctx.shape[1]
        q = self.q(x).view(B, Tq, self.h, d // self.h).transpose(1, 2)
        k, v = self.kv(ctx).view(B, Tk, 2, self.h, d // self.h).unbind(2)
        y = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
                                           dropout_p=self.p if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, Tq, d))


class TransformerLayer(nn.Module):
    """Pre-norm Transformer layer: x + Attn(LN(x), LN(ctx)), then x + FFN(LN(x)) (FFN 4d, GELU).

    ``ctx`` None is self-attention. ``gate`` (B, 1, 1) scales the attention update (0 for
    samples whose source modality is absent, so they keep their own tokens unchanged).
    """

    def __init__(self, d: int, n_heads: int, dropout: float, cross: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.norm_ctx = nn.LayerNorm(d) if cross else None
        self.attn = Attention(d, n_heads, dropout)
        self.norm_ff = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None, ctx: Tensor | None = None,
                gate: Tensor | None = None) -> Tensor:
        q = self.norm(x)
        kv = q if ctx is None else self.norm_ctx(ctx)
        a = self.attn(q, kv, attn_mask)
        if gate is not None:
            a = a * gate
        x = x + self.drop(a)
        return x + self.drop(self.ff(self.norm_ff(x)))


def _encoders(cfg: AlignMambaConfig) -> nn.ModuleDict:
    return nn.ModuleDict({m: UnimodalEncoder(cfg.input_dims[m], cfg.d_model, cfg.encoder, cfg.dropout)
                          for m in cfg.modalities})


def _vectors(cfg: AlignMambaConfig) -> nn.ParameterDict:
    return nn.ParameterDict({m: nn.Parameter(torch.randn(cfg.d_model) * 0.02) for m in cfg.modalities})


# ------------------------------------------------------------------ Transformers

@register_model("transformer_single")
class TransformerSingle(PretrainedMixin, nn.Module):
    """Single-stream Transformer over the packed concatenation of all modalities.

    forward(features {m: (B, T_m, d_m)}, masks {m: (B, T_m)}, present (B, M) | None)
      -> ModelOutput(pred (B,) or (B, C), align_loss 0). Attention cost O((sum_m T_m)^2).
    """

    def __init__(self, config: AlignMambaConfig):
        super().__init__()
        config.validate()
        _check_heads(config)
        self.config = cfg = config
        self.encoders = _encoders(cfg)
        self.mod_emb = _vectors(cfg)  # which modality a token comes from (the sequence is mixed)
        self.layers = nn.ModuleList(TransformerLayer(cfg.d_model, cfg.n_heads, cfg.dropout)
                                    for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = prediction_head(cfg.d_model, cfg.out_dim, cfg.dropout)

    def forward(self, features: dict[str, Tensor], masks: dict[str, Tensor] | None = None,
                present: Tensor | None = None, return_plans: bool = False) -> ModelOutput:
        cfg = self.config
        full = _no_padding(masks, present)
        h, masks = _encode(self, features, masks, present)
        d = cfg.d_model
        add = {m: sinusoidal_positions(h[m].shape[1], d, h[m].device) + self.mod_emb[m][None, :]
               for m in cfg.modalities}
        x, mask = _packed_sequence(cfg, h, masks, add, full)
        attn_mask, _ = _key_mask(mask, full)
        for layer in self.layers:
            x = layer(x, attn_mask)
        x = self.norm(x)
        return _finish(cfg, self.head(masked_pool(x, mask, cfg.pooling)))


@register_model("transformer_multi")
class TransformerMulti(PretrainedMixin, nn.Module):
    """Multi-stream (MulT-style) Transformer.

    For each target t: Z_{s->t} = n_layers cross-modal layers (queries t, keys/values s) for
    every source s != t; Z_t = SelfAttn^{n_layers}(Linear([Z_{s->t}]_s)) (B, T_t, d); pooled
    over t's valid tokens; the M pooled vectors (B, M d) -> head.
    Attention cost O(sum_{t != s} T_t T_s + sum_t T_t^2).
    """

    def __init__(self, config: AlignMambaConfig):
        super().__init__()
        config.validate()
        _check_heads(config)
        self.config = cfg = config
        d, mods = cfg.d_model, list(cfg.modalities)
        self.encoders = _encoders(cfg)
        self.cross = nn.ModuleDict({
            f"{s}_to_{t}": nn.ModuleList(TransformerLayer(d, cfg.n_heads, cfg.dropout, cross=True)
                                         for _ in range(cfg.n_layers))
            for t in mods for s in mods if s != t})
        self.fuse = nn.ModuleDict({t: nn.Linear((len(mods) - 1) * d, d) for t in mods})
        self.memory = nn.ModuleDict({t: nn.ModuleList(TransformerLayer(d, cfg.n_heads, cfg.dropout)
                                                      for _ in range(cfg.n_layers)) for t in mods})
        self.norm = nn.ModuleDict({t: nn.LayerNorm(d) for t in mods})
        self.missing = _vectors(cfg)  # pooled stand-in for an absent target modality
        self.head = _wide_head(len(mods) * d, d, cfg.out_dim, cfg.dropout)

    def forward(self, features: dict[str, Tensor], masks: dict[str, Tensor] | None = None,
                present: Tensor | None = None, return_plans: bool = False) -> ModelOutput:
        cfg = self.config
        full = _no_padding(masks, present)
        h, masks = _encode(self, features, masks, present)
        x = {m: (h[m] + sinusoidal_positions(h[m].shape[1], cfg.d_model, h[m].device, h[m].dtype))
             * masks[m][..., None].to(h[m].dtype) for m in cfg.modalities}
        keys = {m: _key_mask(masks[m], full) for m in cfg.modalities}
        pooled = []
        for t in cfg.modalities:
            streams = []
            for s in cfg.modalities:
                if s == t:
                    continue
                src_mask, src_has = keys[s]
                gate = src_has[:, None, None].to(x[t].dtype)
                z = x[t]
                for layer in self.cross[f"{s}_to_{t}"]:
                    z = layer(z, src_mask, ctx=x[s], gate=gate)
                streams.append(z)
            z = self.fuse[t](torch.cat(streams, -1))
            tgt_mask, tgt_has = keys[t]
            for layer in self.memory[t]:
                z = layer(z, tgt_mask)
            p = masked_pool(self.norm[t](z), masks[t], cfg.pooling)
            pooled.append(torch.where(tgt_has[:, None], p, self.missing[t].to(p.dtype).expand_as(p)))
        return _finish(cfg, self.head(torch.cat(pooled, -1)))


# ------------------------------------------------------------------ Mamba without alignment

def _mamba(cfg: AlignMambaConfig) -> nn.Module:
    from .ssm import MambaStack
    return MambaStack(cfg.d_model, cfg.n_layers, cfg.d_state, cfg.d_conv, cfg.expand, cfg.dropout,
                      scan_backend=cfg.scan_backend)


@register_model("mamba_single")
class MambaSingle(PretrainedMixin, nn.Module):
    """Naive single-stream Mamba fusion: packed concatenation (no alignment, no MMD) -> MambaStack.

    Tokens carry a modality embedding and no position code (the scan is ordered already),
    as in AlignMamba's fused sequence. Cost linear in sum_m T_m.
    """

    def __init__(self, config: AlignMambaConfig):
        super().__init__()
        config.validate()
        self.config = cfg = config
        self.encoders = _encoders(cfg)
        self.mod_emb = _vectors(cfg)
        self.backbone = _mamba(cfg)
        self.head = prediction_head(cfg.d_model, cfg.out_dim, cfg.dropout)

    def forward(self, features: dict[str, Tensor], masks: dict[str, Tensor] | None = None,
                present: Tensor | None = None, return_plans: bool = False) -> ModelOutput:
        cfg = self.config
        full = _no_padding(masks, present)
        h, masks = _encode(self, features, masks, present)
        x, mask = _packed_sequence(cfg, h, masks, {m: self.mod_emb[m] for m in cfg.modalities}, full)
        y = self.backbone(x, mask)
        return _finish(cfg, self.head(masked_pool(y, mask, cfg.pooling)))


@register_model("mamba_multi")
class MambaMulti(PretrainedMixin, nn.Module):
    """Naive multi-stream Mamba fusion: one MambaStack per modality, pooled, concatenated -> head."""

    def __init__(self, config: AlignMambaConfig):
        super().__init__()
        config.validate()
        self.config = cfg = config
        self.encoders = _encoders(cfg)
        self.streams = nn.ModuleDict({m: _mamba(cfg) for m in cfg.modalities})
        self.missing = _vectors(cfg)
        self.head = _wide_head(len(cfg.modalities) * cfg.d_model, cfg.d_model, cfg.out_dim, cfg.dropout)

    def forward(self, features: dict[str, Tensor], masks: dict[str, Tensor] | None = None,
                present: Tensor | None = None, return_plans: bool = False) -> ModelOutput:
        cfg = self.config
        h, masks = _encode(self, features, masks, present)
        pooled = []
        for m in cfg.modalities:
            p = masked_pool(self.streams[m](h[m], masks[m]), masks[m], cfg.pooling)
            has = masks[m].any(1, keepdim=True)
            pooled.append(torch.where(has, p, self.missing[m].to(p.dtype).expand_as(p)))
        return _finish(cfg, self.head(torch.cat(pooled, -1)))
