"""AlignMamba (SPEC section 1), read top to bottom.

    features[m] (B, T_m, d_m) --encoder--> X_m (B, T_m, d)                      (step 1)
    X~_m = relaxed-OT(X_m -> X_anchor)        (B, T_anchor, d) per source m     (step 2, eq. 3-6)
    L_align = sum_m MMD^2(X~_m, X_anchor)                                     (step 3, eq. 7-10)
    X_mm = interleave(X~_v^t, X~_a^t, X_l^t for t = 1..T_anchor)  (B, M T_anchor, d)   (eq. 11)
    y = head(pool(MambaStack(X_mm)))                                           (step 4)

The training objective L = L_task + lambda L_align (eq. 12) is assembled by the trainer
from ``ModelOutput.pred`` and ``ModelOutput.align_loss`` (already multiplied by lambda).

Every hyper-parameter the paper leaves open lives in :class:`AlignMambaConfig` with a
documented default. The same config type also drives the baselines of ``baselines.py``
(``model=...`` picks the class through :func:`build_model`).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import alignment as al
from .errors import AlignMambaError, ConfigError
from .ssm import MambaStack


@dataclass
class AlignMambaConfig:
    """Hyper-parameters of AlignMamba and of the baselines sharing its data path.

    Defaults are ours where the paper is silent (d, depth, d_state, lambda, sigma).
    """

    model: str = "alignmamba"  # registered model name: alignmamba | transformer_single | ...
    modalities: list[str] = field(default_factory=lambda: ["text", "audio", "vision"])
    input_dims: dict[str, int] = field(default_factory=lambda: {"text": 768, "audio": 5, "vision": 20})
    anchor: str = "text"  # the modality every other one is aligned to (language in the paper)
    # order of the tokens inside one time step of the fused sequence (eq. 11: video, audio, language)
    interleave_order: list[str] = field(default_factory=lambda: ["vision", "audio", "text"])
    d_model: int = 64  # common width d of step 1
    n_layers: int = 2  # Mamba layers in the fusion stack
    d_state: int = 16  # N of the selective SSM
    d_conv: int = 4  # depthwise causal conv width of the Mamba block
    expand: int = 2  # d_inner = expand * d_model
    dropout: float = 0.1
    encoder: str = "mlp"  # unimodal encoder: "linear" | "mlp" (Linear-GELU-Linear) | "conv" (Conv1d k=3)
    modality_embedding: bool = True  # add a learned per-modality vector to every token before fusion
    # alignment (step 2) and its ablation switches
    use_ot: bool = True  # False: resample sources to the anchor grid (adaptive average pooling)
    ot_plan: str = "relaxed"  # "relaxed" (eq. 5, the paper) | "sinkhorn" (entropic, differentiable)
    ot_normalize: str = "mass"  # "mass": eq. 6 (divide by T_src) | "mean": average of matched tokens
    ot_time_beta: float = 0.0  # order-aware cost: + beta |t_i - t_j| (0 = the paper)
    sinkhorn_eps: float = 0.05
    sinkhorn_iters: int = 50
    use_mmd: bool = True  # False: no global alignment loss
    align_lambda: float = 0.1  # lambda of eq. 12
    mmd_sigma: float = 1.0  # sigma of eq. 9
    mmd_bandwidth: str = "fixed"  # "fixed" (paper) | "median" | "multi"
    fusion: str = "interleave"  # "interleave" (eq. 11) | "concat" (single-stream ablation)
    pooling: str = "mean"  # "mean" | "max" | "last" over the valid fused tokens
    task: str = "regression"  # "regression" | "classification"
    num_classes: int = 2  # used when task == "classification"
    n_heads: int = 4  # attention heads of the Transformer baselines
    scan_backend: str | None = None  # None/"auto" | "ref" | "torch" | "triton" | "mamba_ssm"
    # text encoder (text_encoder.py, docs/BERT.md): "features" = the file's frozen 768-d
    # features (default); "bert" = fine-tune a local BERT on the batch's text_bert token ids
    text_encoder: str = "features"
    bert_path: str | None = None  # local BERT directory (read once when a fresh model is built)
    bert_freeze_layers: int = 0  # freeze the BERT embeddings and its first k layers
    bert_grad_checkpointing: bool = False  # recompute BERT layers in backward (saves memory)
    # the BERT architecture as plain JSON, filled in from bert_path when the model is built;
    # a checkpoint rebuilds BertModel(BertConfig(**bert_config)) from it without bert_path
    bert_config: dict | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError on inconsistent settings (one line each)."""
        mods = list(self.modalities)
        if len(mods) < 2 or len(set(mods)) != len(mods):
            raise ConfigError(f"model.modalities: need 2 or more distinct names, got {mods}")
        missing = [m for m in mods if m not in self.input_dims]
        if missing:
            raise ConfigError(f"model.input_dims: no width for modality '{missing[0]}'")
        if self.anchor not in mods:
            raise ConfigError(f"model.anchor: '{self.anchor}' is not one of {mods}")
        if sorted(self.interleave_order) != sorted(mods):
            raise ConfigError(f"model.interleave_order: {list(self.interleave_order)} must list each of {mods} once")
        checks = {
            "encoder": ("linear", "mlp", "conv"), "ot_plan": ("relaxed", "sinkhorn"),
            "ot_normalize": ("mass", "mean"), "mmd_bandwidth": ("fixed", "median", "multi"),
            "fusion": ("interleave", "concat"), "pooling": ("mean", "max", "last"),
            "task": ("regression", "classification"), "text_encoder": ("features", "bert"),
        }
        for key, allowed in checks.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"model.{key}: {getattr(self, key)!r} is not one of {list(allowed)}")
        for key in ("d_model", "n_layers", "d_state", "d_conv", "expand", "n_heads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}: must be >= 1, got {getattr(self, key)}")
        if self.task == "classification" and self.num_classes < 2:
            raise ConfigError(f"model.num_classes: need >= 2 for classification, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")
        self._validate_text_encoder()

    def _validate_text_encoder(self) -> None:
        if self.bert_freeze_layers < 0:
            raise ConfigError(f"model.bert_freeze_layers: must be >= 0, got {self.bert_freeze_layers}")
        if self.bert_config is not None and not isinstance(self.bert_config, dict):
            raise ConfigError("model.bert_config: expected a mapping (the BERT's config.json)")
        if self.text_encoder != "bert":
            given = "bert_path" if self.bert_path is not None else "bert_config" if self.bert_config else None
            if given:
                raise ConfigError(f"model.{given}: only used with model.text_encoder=bert "
                                  f"(got text_encoder={self.text_encoder!r}; add --text-encoder bert)")
            return
        if self.model != "alignmamba":
            raise ConfigError(f"model.text_encoder: 'bert' is implemented for model 'alignmamba' only, "
                              f"not '{self.model}'")
        if "text" not in self.modalities:
            raise ConfigError(f"model.text_encoder: 'bert' encodes the 'text' modality, which is not one of "
                              f"{list(self.modalities)}")
        if self.bert_path is None and self.bert_config is None:
            raise ConfigError("model.bert_path: --text-encoder bert needs --bert-path DIR (a local BERT directory)")

    @property
    def sources(self) -> list[str]:
        return [m for m in self.modalities if m != self.anchor]

    @property
    def out_dim(self) -> int:
        return self.num_classes if self.task == "classification" else 1


@dataclass
class ModelOutput:
    pred: Tensor  # (B,) regression score or (B, C) logits
    align_loss: Tensor  # scalar, lambda * sum_src mean_b MMD^2 over samples with both present (0 when unused)
    plans: dict[str, Tensor] | None = None  # source name -> (B, T_src, T_anchor) transport plan


# ------------------------------------------------------------------ model registry

MODELS: dict[str, Callable[[AlignMambaConfig], nn.Module]] = {}


def register_model(name: str) -> Callable[[type], type]:
    """Class decorator: make a model constructible as ``build_model(cfg)`` with cfg.model == name."""
    def deco(cls: type) -> type:
        MODELS[name] = cls
        cls.model_name = name
        return cls
    return deco


def build_model(cfg: AlignMambaConfig) -> nn.Module:
    """Instantiate the model named ``cfg.model`` (AlignMamba or a baseline)."""
    from . import baselines  # noqa: F401  (registers the baselines)
    if cfg.model not in MODELS:
        raise ConfigError(f"model.model: unknown model '{cfg.model}' (known: {', '.join(sorted(MODELS))})")
    return MODELS[cfg.model](cfg)


# ------------------------------------------------------------------ building blocks

class UnimodalEncoder(nn.Module):
    """Step 1: project one modality (B, T, d_m) to the common width (B, T, d)."""

    def __init__(self, d_in: int, d: int, kind: str, dropout: float):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.net = nn.Linear(d_in, d)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(d_in, d), nn.GELU(), nn.Dropout(dropout), nn.Linear(d, d))
        else:  # conv: a local temporal context, as MulT's Conv1d projections
            self.net = nn.Conv1d(d_in, d, kernel_size=3, padding=1)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x * mask[..., None].to(x.dtype)  # padding must not reach real tokens through the conv
        h = self.net(x.transpose(1, 2)).transpose(1, 2) if self.kind == "conv" else self.net(x)
        return self.norm(h) * mask[..., None].to(h.dtype)


def masked_pool(x: Tensor, mask: Tensor, how: str) -> Tensor:
    """Pool (B, T, d) over valid positions -> (B, d). Samples with no valid token give 0."""
    m = mask[..., None].to(x.dtype)
    if how == "mean":
        return (x * m).sum(1) / m.sum(1).clamp(min=1.0)
    if how == "max":
        out = x.masked_fill(~mask[..., None], float("-inf")).amax(1)
        return torch.where(mask.any(1, keepdim=True), out, torch.zeros_like(out))
    # "last": the final valid token (causal summary). The index of the last True, not
    # ``mask.sum(1) - 1``: token-level missing modalities leave holes in the mask.
    pos = torch.arange(mask.shape[1], device=mask.device)
    last = (pos * mask.to(pos.dtype)).amax(1)  # (B,); 0 for a sample with no valid token
    return x[torch.arange(x.shape[0], device=x.device), last] * mask.any(1, keepdim=True).to(x.dtype)


def pack_valid(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Move each sample's valid tokens to the front, keeping their order. (B, T, d), (B, T)."""
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    x = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
    return x, mask.gather(1, order)


def prediction_head(d: int, out_dim: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(dropout), nn.Linear(d, out_dim))


class PretrainedMixin:
    """``save_pretrained(dir)`` / ``from_pretrained(dir)``: config.json + model.safetensors."""

    config: AlignMambaConfig

    def save_pretrained(self, directory: str | os.PathLike, extra: dict | None = None) -> None:
        from .checkpoint import save_checkpoint
        save_checkpoint(self, directory, extra)  # type: ignore[arg-type]

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
        from .checkpoint import load_checkpoint
        return load_checkpoint(directory, map_location)


# ------------------------------------------------------------------ the model

@register_model("alignmamba")
class AlignMamba(PretrainedMixin, nn.Module):
    """AlignMamba: OT-aligned, MMD-regularised, interleaved Mamba fusion.

    forward(features, masks, present=None, return_plans=False) -> ModelOutput
      features: {m: (B, T_m, d_m)}, masks: {m: (B, T_m) bool} (None = all valid),
      present: (B, M) bool in ``cfg.modalities`` order, False = modality m missing for
      that sample (its features are ignored; see the comment in ``forward``).
    """

    def __init__(self, config: AlignMambaConfig):
        super().__init__()
        config.validate()
        self.config = cfg = config
        d = cfg.d_model
        self.encoders = nn.ModuleDict({m: UnimodalEncoder(cfg.input_dims[m], d, cfg.encoder, cfg.dropout)
                                       for m in cfg.modalities if not self._bert_text(m)})
        if cfg.text_encoder == "bert":  # step 1 for text from token ids (text_encoder.py)
            from .text_encoder import BertTextEncoder
            enc = BertTextEncoder(d, cfg.bert_path, cfg.bert_config, cfg.bert_freeze_layers,
                                  cfg.bert_grad_checkpointing)
            if cfg.bert_config is None:  # saved with the checkpoint: reloading needs no bert_path
                cfg.bert_config = enc.bert_config
            self.encoders["text"] = enc
        # A learned token that stands in for an absent modality (incomplete setting): the
        # fused sequence keeps its fixed layout and the Mamba sees "missing", not zeros.
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.randn(d) * 0.02) for m in cfg.modalities})
        if cfg.modality_embedding:
            self.mod_emb = nn.ParameterDict({m: nn.Parameter(torch.randn(d) * 0.02) for m in cfg.modalities})
        self.backbone = MambaStack(d, cfg.n_layers, cfg.d_state, cfg.d_conv, cfg.expand, cfg.dropout,
                                   scan_backend=cfg.scan_backend)
        self.head = prediction_head(d, cfg.out_dim, cfg.dropout)

    # -- step 2: local alignment of one source to the anchor
    def _align(self, src: Tensor, src_mask: Tensor, anc: Tensor, anc_mask: Tensor,
               want_plan: bool) -> tuple[Tensor, Tensor | None]:
        cfg = self.config
        if not cfg.use_ot:
            return al.resample_to(src, src_mask, anc.shape[1], anc_mask), None
        if cfg.ot_plan == "sinkhorn":
            plan = al.sinkhorn_plan(src, anc, src_mask, anc_mask, cfg.sinkhorn_eps, cfg.sinkhorn_iters,
                                    cfg.ot_time_beta)
            return plan.transpose(1, 2).to(src.dtype) @ src, plan if want_plan else None
        aligned = al.relaxed_ot_align(src, anc, src_mask, anc_mask, cfg.ot_time_beta, cfg.ot_normalize)
        plan = al.relaxed_ot_plan(src, anc, src_mask, anc_mask, cfg.ot_time_beta) if want_plan else None
        return aligned, plan

    def _bert_text(self, m: str) -> bool:
        return self.config.text_encoder == "bert" and m == "text"

    def forward(self, features: dict[str, Tensor], masks: dict[str, Tensor] | None = None,
                present: Tensor | None = None, return_plans: bool = False,
                text_bert: Tensor | None = None, align_loss: bool | None = None) -> ModelOutput:
        """text_bert: (B, 3, T_text) token ids / attention mask / segment ids; required (and
        only used) with ``text_encoder="bert"``, where it replaces ``features["text"]``.
        align_loss: compute L_align (eq. 8-10); None = in training mode only. It is a training
        term (validation selects on the task loss), and at long inputs its kernel sums cost
        more than the rest of the alignment; when skipped, ``ModelOutput.align_loss`` is 0."""
        cfg = self.config
        anchor = cfg.anchor
        bert = cfg.text_encoder == "bert"
        want_align = self.training if align_loss is None else bool(align_loss)
        if bert and text_bert is None:
            raise AlignMambaError("model.text_encoder=bert: the batch has no 'text_bert' token ids (the data "
                                  "file must carry MMSA's text_bert; MulT pickles do not)")
        ref = text_bert if bert and anchor == "text" else features[anchor]
        B = ref.shape[0]
        given = masks or {}
        masks = {m: (given[m].to(torch.bool) if m in given else
                     torch.ones(features[m].shape[:2], dtype=torch.bool, device=ref.device))
                 for m in cfg.modalities if not self._bert_text(m)}
        # Without ``present`` every modality is there, and the per-sample fallbacks for absent
        # ones are skipped statically: a data-dependent Python ``if`` on a device tensor would
        # be a host sync per step (and cannot be captured in a CUDA graph).
        some_missing = present is not None
        if present is None:
            present = torch.ones(B, len(cfg.modalities), dtype=torch.bool, device=ref.device)
        # step 1: unimodal encoders (BERT: the text mask comes from text_bert's attention row)
        h = {m: self.encoders[m](features[m].to(self.missing[m].dtype), masks[m])
             for m in cfg.modalities if not self._bert_text(m)}
        if bert:
            h["text"], masks["text"] = self.encoders["text"](text_bert.to(ref.device), given.get("text"))
        # Missing modalities (incomplete setting). An absent source sends no mass (its mask is
        # emptied) and is replaced by its learned missing token at every anchor position. An
        # absent anchor keeps its time grid (its mask) but its tokens become the missing token,
        # and the sources are resampled onto that grid instead of OT-aligned (a cosine cost to
        # a constant token is meaningless). MMD terms involving an absent modality are dropped.
        pres = {m: present[:, i].to(torch.bool) for i, m in enumerate(cfg.modalities)}
        masks = {m: (mk & pres[m][:, None]) if m != anchor else mk for m, mk in masks.items()}
        anc_mask = masks[anchor]
        anc_present = pres[anchor]
        anc = torch.where(anc_present[:, None, None], h[anchor],
                          self.missing[anchor].to(h[anchor].dtype).expand_as(h[anchor]))
        anc = anc * anc_mask[..., None].to(anc.dtype)
        # step 2 + 3: local alignment to the anchor and the global MMD loss
        aligned: dict[str, Tensor] = {anchor: anc}
        plans: dict[str, Tensor] = {}
        align_terms = []
        for m in cfg.sources:
            x_al, plan = self._align(h[m], masks[m], h[anchor], anc_mask & anc_present[:, None], return_plans)
            if some_missing:  # samples without the anchor: time-resample instead (no sync:
                # both are computed and selected per sample)
                resampled = al.resample_to(h[m], masks[m], anc.shape[1], anc_mask)
                x_al = torch.where(anc_present[:, None, None], x_al, resampled)
            if plan is not None:
                plans[m] = plan
            if cfg.use_mmd and want_align:
                both = pres[m] & anc_present
                mmd = al.mmd2(x_al, h[anchor], cfg.mmd_sigma, anc_mask, anc_mask, cfg.mmd_bandwidth)
                # mean over the samples where this term is defined (source and anchor present):
                # averaging over the whole batch would shrink L_align with the missing rate.
                # The clamp, not a Python ``if``, keeps it sync-free (CUDA-graph capturable).
                w = both.to(mmd.dtype)
                align_terms.append((mmd * w).sum() / w.sum().clamp(min=1.0))
            # absent source: the missing token at every valid anchor position
            fill = self.missing[m].to(x_al.dtype).expand_as(x_al)
            x_al = torch.where(pres[m][:, None, None], x_al, fill) * anc_mask[..., None].to(x_al.dtype)
            aligned[m] = x_al
        if cfg.modality_embedding:
            aligned = {m: x + self.mod_emb[m].to(x.dtype) * anc_mask[..., None].to(x.dtype)
                       for m, x in aligned.items()}
        # step 4: fusion (eq. 11) and prediction
        order = cfg.interleave_order
        if cfg.fusion == "interleave":
            x_mm = torch.stack([aligned[m] for m in order], dim=2).flatten(1, 2)  # (B, M T, d)
            m_mm = anc_mask[:, :, None].expand(-1, -1, len(order)).flatten(1, 2)
        else:  # single-stream ablation: aligned sequences one after the other, padding packed out
            x_mm, m_mm = pack_valid(torch.cat([aligned[m] for m in order], 1),
                                    torch.cat([anc_mask] * len(order), 1))
        fused = self.backbone(x_mm, m_mm)
        pred = self.head(masked_pool(fused, m_mm, cfg.pooling))
        pred = pred.squeeze(-1) if cfg.task == "regression" else pred
        if align_terms:
            align_loss = cfg.align_lambda * torch.stack(align_terms, 0).sum()
        else:
            align_loss = pred.new_zeros(())
        return ModelOutput(pred=pred, align_loss=align_loss, plans=plans if return_plans else None)
