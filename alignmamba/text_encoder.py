"""Fine-tuned BERT text encoder (optional; ``pip install "alignmamba[bert]"``).

With ``model.text_encoder = "bert"`` the text modality's step-1 encoder (SPEC section 1,
step 1) is a Hugging Face ``BertModel`` run on the token ids that MMSA pickles store in
``text_bert`` (B, 3, T): row 0 token ids, row 1 attention mask, row 2 segment ids. Its
last hidden states (B, T, H) are projected to the common width d and normalised, exactly
where :class:`~alignmamba.model.UnimodalEncoder` would project the frozen 768-d features.
This is the setting of MMSA's ``use_bert`` models and of the best published MOSI/MOSEI rows.

Loading rules:

* a fresh model reads a *local* directory (``model.bert_path``) with ``local_files_only``:
  nothing is ever downloaded at run time (docs/BERT.md says how to get the directory once);
* the BERT architecture is then stored as plain JSON in our config (``model.bert_config``)
  and its weights are part of our state dict, so a checkpoint rebuilds the encoder as
  ``BertModel(BertConfig(**bert_config))`` without the original directory and without
  executing any code from the checkpoint.

``transformers`` is imported only here and only when a BERT encoder is built; the default
frozen-feature path never touches it.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import AlignMambaError, ConfigError, DataError

INSTALL_HINT = "--text-encoder bert needs the transformers package: pip install 'alignmamba[bert]'"

# Keys of ``BertConfig.to_dict()`` that describe where a model came from, not its
# architecture; they are dropped from ``model.bert_config`` (id2label has int keys that JSON
# would turn into strings, and a BertModel has no label head anyway).
_META_KEYS = ("transformers_version", "architectures", "id2label", "label2id", "dtype", "torch_dtype")


def import_bert() -> tuple[type, type]:
    """``(BertConfig, BertModel)`` from transformers, or AlignMambaError with the install line."""
    try:
        from transformers import BertConfig, BertModel
    except ImportError:
        raise AlignMambaError(INSTALL_HINT) from None
    except RuntimeError as e:  # transformers' lazy import wraps a broken install in RuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AlignMambaError(f"--text-encoder bert: transformers failed to import ({first})") from None
    return BertConfig, BertModel


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report (the unused pooler weights) and progress bars
    while loading, and restore the user's settings afterwards."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def bert_config_dict(config: Any) -> dict[str, Any]:
    """The architecture of a ``BertConfig`` as a JSON-ready dict (for ``model.bert_config``)."""
    d = config.to_dict()
    out = {k: v for k, v in d.items() if not k.startswith("_") and k not in _META_KEYS}
    return json.loads(json.dumps(out))  # plain JSON types only (fails loudly on anything else)


def load_local_bert(path: str | Path) -> nn.Module:
    """``BertModel`` (no pooler) with the weights of the local directory ``path``. Never downloads."""
    _, BertModel = import_bert()
    p = Path(path).expanduser()
    hint = "see docs/BERT.md for getting bert-base-uncased once"
    if not p.is_dir():
        raise ConfigError(f"--bert-path {p}: not a directory ({hint})")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"--bert-path {p}: no config.json (not a Hugging Face model directory; {hint})")
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--bert-path {cfg_file}: unreadable ({type(e).__name__})") from None
    kind = meta.get("model_type") if isinstance(meta, dict) else None
    if kind != "bert":
        raise ConfigError(f"--bert-path {p}: model_type is {kind!r}, expected 'bert'")
    try:
        with _quiet_transformers():
            # add_pooling_layer=False: only the token states are used, the pooler would be dead
            # weight in every checkpoint (and gradient-less in the optimizer).
            model = BertModel.from_pretrained(str(p), local_files_only=True, add_pooling_layer=False)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--bert-path {p}: cannot load the BERT weights ({first})") from None
    # float32 like the rest of AlignMamba whatever dtype the directory was saved in (upcasting
    # half-precision weights is exact); mixed precision is autocast's job (train.amp)
    return model.float()


class BertTextEncoder(nn.Module):
    """Step 1 for the text modality from token ids: ``text_bert`` (B, 3, T) -> (B, T, d).

    h = LayerNorm(W BERT(ids, attention_mask, segment_ids).last_hidden_state + b), zero at
    padding. Exactly one of ``bert_path`` (a fresh model: pre-trained weights from that local
    directory) and ``bert_config`` (a checkpoint: architecture only, weights come with the
    state dict) is used; ``bert_config`` wins when both are given.

    freeze_layers: k >= 0 freezes the embeddings and the first k transformer layers (k = 0
      trains everything; k = number of layers freezes the whole BERT).
    grad_checkpointing: recompute each BERT layer in the backward pass (less memory for
      activations, one more forward of BERT per step).
    """

    def __init__(self, d: int, bert_path: str | None = None, bert_config: dict[str, Any] | None = None,
                 freeze_layers: int = 0, grad_checkpointing: bool = False):
        super().__init__()
        BertConfig, BertModel = import_bert()
        if bert_config is not None:
            try:
                self.bert = BertModel(BertConfig(**bert_config), add_pooling_layer=False)
            except (TypeError, ValueError, AttributeError) as e:
                raise ConfigError(f"model.bert_config: not a usable BERT configuration ({e})") from None
            where = "model.bert_config"
        elif bert_path is not None:
            self.bert = load_local_bert(bert_path)
            where = f"--bert-path {bert_path}"
        else:
            raise ConfigError("model.bert_path: --text-encoder bert needs --bert-path DIR (a local BERT directory)")
        self.bert_config: dict[str, Any] = bert_config_dict(self.bert.config)
        bc = self.bert.config
        self.vocab_size = int(bc.vocab_size)
        self.type_vocab_size = int(bc.type_vocab_size)
        self.max_positions = int(bc.max_position_embeddings)
        n_layers = len(self.bert.encoder.layer)
        if not 0 <= freeze_layers <= n_layers:
            raise ConfigError(f"model.bert_freeze_layers: {freeze_layers} is outside 0..{n_layers} "
                              f"(the BERT of {where} has {n_layers} layers)")
        self.freeze_layers = freeze_layers
        if freeze_layers > 0:
            frozen = [self.bert.embeddings, *self.bert.encoder.layer[:freeze_layers]]
            for module in frozen:
                for p in module.parameters():
                    p.requires_grad_(False)
        if grad_checkpointing:
            # non-reentrant checkpointing: correct with frozen embeddings (inputs without grad).
            # transformers 5 renamed the switch; 4.x only has the old name.
            kw = {"use_reentrant": False}
            if hasattr(self.bert, "activation_checkpointing_enable"):
                self.bert.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                self.bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
            self.bert.config.use_cache = False  # an encoder has no cache; silences transformers' notice
        self.proj = nn.Linear(int(bc.hidden_size), d)
        self.norm = nn.LayerNorm(d)

    def check_tokens(self, text_bert: Tensor) -> None:
        """Raise DataError when ``text_bert`` (B, 3, T) cannot be fed to this BERT."""
        if text_bert.ndim != 3 or text_bert.shape[1] != 3:
            raise DataError(f"text_bert: expected (B, 3, T) token ids / mask / segment ids, got {tuple(text_bert.shape)}")
        if text_bert.is_floating_point() or text_bert.is_complex():
            raise DataError(f"text_bert: expected integer token ids, got {text_bert.dtype}")
        t = text_bert.shape[-1]
        if t > self.max_positions:
            raise DataError(f"text_bert: {t} tokens, more than the BERT's max_position_embeddings "
                            f"({self.max_positions})")
        if text_bert.numel() == 0:
            return
        # one device sync per batch; cheap next to a BERT forward and it turns an opaque
        # index error (or a CUDA assert) into a line that names the cause
        lo = text_bert.amin(dim=(0, 2)).tolist()
        hi = text_bert.amax(dim=(0, 2)).tolist()
        if lo[0] < 0 or hi[0] >= self.vocab_size:
            bad = hi[0] if hi[0] >= self.vocab_size else lo[0]
            raise DataError(f"text_bert: token id {bad} is outside the BERT vocabulary (0..{self.vocab_size - 1}); "
                            "were the ids made with this BERT's tokenizer?")
        if lo[1] < 0 or hi[1] > 1:
            raise DataError("text_bert: row 1 (attention mask) must hold only 0 and 1")
        if lo[2] < 0 or hi[2] >= self.type_vocab_size:
            raise DataError(f"text_bert: segment id outside 0..{self.type_vocab_size - 1}")

    def forward(self, text_bert: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """text_bert (B, 3, T) int; mask (B, T) bool or None -> (h (B, T, d), mask (B, T) bool).

        The text mask is the attention-mask row of ``text_bert``, intersected with ``mask``
        when given (token-level missing protocols drop text tokens through the batch mask);
        dropped tokens are hidden from BERT's attention as well.
        """
        self.check_tokens(text_bert)
        ids, seg = text_bert[:, 0].long(), text_bert[:, 2].long()
        m = text_bert[:, 1] != 0
        if mask is not None:
            if tuple(mask.shape) != tuple(m.shape):
                raise DataError(f"text_bert: {m.shape[1]} token columns but the text mask is "
                                f"{tuple(mask.shape)}; they must describe the same positions")
            m = m & mask.to(device=m.device, dtype=torch.bool)
        # A row with no real token would make every attention score -inf (NaN softmax in some
        # kernels): let such rows attend to position 0; their outputs are zeroed below anyway.
        att = m.clone()
        if att.shape[1] > 0:
            att[:, 0] |= ~m.any(1)
        hidden = self.bert(input_ids=ids, attention_mask=att.long(), token_type_ids=seg).last_hidden_state
        h = self.norm(self.proj(hidden))
        return h * m[..., None].to(h.dtype), m
