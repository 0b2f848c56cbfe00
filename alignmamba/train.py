"""One training loop for every model: configs, presets, train / select / test, several seeds.

L = L_task + lambda L_align (eq. 12): L1 (default, as MMSA) or MSE for regression,
cross-entropy for classification. Model selection by validation loss with early stopping
(MMSA's protocol), the best weights reloaded and evaluated on test. Several seeds give
per-seed rows and their mean / standard deviation.

Output directory (``train.out``)::

    config.json            the resolved ExperimentConfig
    metrics.json           {"test": means, "test_std": stds, "seeds": [per-seed dicts]}
    seed_<s>/log.csv       one row per epoch
    seed_<s>/curves.png    loss and validation metric per epoch (when matplotlib is there)
    seed_<s>/best/         best checkpoint (config.json + model.safetensors)
    seed_<s>/last/         state after the latest epoch, for ``--resume`` (see train_state.py)
    seed_<s>/result.json   the seed's record, written when the seed is finished
    seed_<s>/test_predictions.csv

Every file is written to a temporary name and renamed; checkpoint directories are
swapped in whole, so a killed run never leaves a half-written file or checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D
from .checkpoint import atomic_write_json, atomic_write_text
from .config import apply_overrides, from_dict, load_file, merge_dicts, to_dict
from .errors import AlignMambaError, ConfigError
from .metrics import classification_metrics, msa_metrics
from .model import AlignMambaConfig, build_model

# ------------------------------------------------------------------ configs

@dataclass
class DataConfig:
    dataset: str = "synthetic"  # "synthetic" | "mosi" | "mosei" (a preset name; the file decides the shapes)
    path: str | None = None  # MMSA or MulT pickle; None with dataset=synthetic generates data in memory
    synthetic_like: str = "mosi"  # shapes of the generated data: "mosi" | "mosei"
    synthetic_aligned: bool = False  # generated data aligned (all 50 steps) or unaligned
    synthetic_seed: int = 0  # seed of the generated data (independent of the training seeds)
    synthetic_n_train: int | None = None  # None: the real split sizes of MOSI / MOSEI
    synthetic_n_valid: int | None = None
    synthetic_n_test: int | None = None
    batch_size: int = 32  # global batch size (split across processes under DDP)
    eval_batch_size: int = 128
    num_workers: int = 0
    missing_protocol: str = "none"  # "none" | "imder" (whole modalities) | "tokens" (frames)
    missing_rate: float = 0.0  # training missing rate; < 0 draws a rate in [0.1, 0.7] per batch
    nonfinite: str = "sanitize"  # NaN/Inf in features: "sanitize" (set to 0, warn with counts) | "refuse"


@dataclass
class OptimConfig:
    name: str = "adamw"  # "adamw" | "adam" | "sgd"
    lr: float = 1e-3
    weight_decay: float = 1e-4  # not applied to biases, norms, A_log, D, embeddings
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9  # sgd only
    scheduler: str = "cosine"  # "cosine" | "none" | "plateau" | "step"
    warmup_epochs: int = 1  # linear warm-up (cosine / none)
    step_size: int = 10  # "step" scheduler period in epochs
    gamma: float = 0.5  # "step" / "plateau" decay factor
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    # the fine-tuned BERT text encoder (model.text_encoder=bert) has its own group: the usual
    # BERT fine-tuning rate and decay (biases / LayerNorm in BERT are not decayed either)
    bert_lr: float = 2e-5
    bert_weight_decay: float = 0.01


@dataclass
class TrainConfig:
    epochs: int = 30
    patience: int = 8  # early stopping on validation loss (MMSA uses 8)
    seeds: list[int] = field(default_factory=lambda: [1111])
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    loss: str = "l1"  # regression task loss: "l1" | "mse"
    out: str = "runs/latest"
    quiet: bool = False  # no progress bar, one line per epoch only
    on_nonfinite_loss: str = "stop"  # "stop" (keep the best checkpoint) | "skip" (skip the step)
    threads: int = 0  # torch CPU threads; 0 = leave torch's default
    seed_parallel: bool = False  # one process per seed, one seed per GPU (docs/DISTRIBUTED.md)
    # CUDA graphs for the training step (graphs.py, docs/ARCHITECTURE.md "Fast CUDA training
    # step"): forward and backward replayed as graphs, the split kept on the GPU, fused AdamW.
    # Ignored with one warning on CPU, under DDP, with missing-modality training or BERT text.
    cuda_graphs: bool = False
    # PyTorch's deterministic algorithms for the run (deterministic_mode): a CUDA run repeats
    # bitwise (same machine, same software); our kernels follow the flag (the scan's backward
    # sums dB/dC per channel block in a fixed order, the OT aggregation index-adds). Slower.
    deterministic: bool = False


@dataclass
class ExperimentConfig:
    model: AlignMambaConfig = field(default_factory=AlignMambaConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        self.model.validate()
        choices = {
            ("data", "dataset"): ("synthetic", "mosi", "mosei"),
            ("data", "synthetic_like"): ("mosi", "mosei"),
            ("data", "missing_protocol"): ("none", "imder", "tokens"),
            ("data", "nonfinite"): ("sanitize", "refuse"),
            ("optim", "name"): ("adamw", "adam", "sgd"),
            ("optim", "scheduler"): ("cosine", "none", "plateau", "step"),
            ("train", "loss"): ("l1", "mse"),
            ("train", "on_nonfinite_loss"): ("stop", "skip"),
        }
        for (sec, key), allowed in choices.items():
            val = getattr(getattr(self, sec), key)
            if val not in allowed:
                raise ConfigError(f"{sec}.{key}: {val!r} is not one of {list(allowed)}")
        if self.data.batch_size < 1 or self.data.eval_batch_size < 1:
            raise ConfigError("data.batch_size: must be >= 1")
        if self.train.epochs < 1:
            raise ConfigError(f"train.epochs: must be >= 1, got {self.train.epochs}")
        if not self.train.seeds:
            raise ConfigError("train.seeds: give at least one seed")
        if self.data.missing_rate > 1.0:
            raise ConfigError(f"data.missing_rate: must be <= 1, got {self.data.missing_rate}")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr: must be > 0, got {self.optim.lr}")
        if self.optim.bert_lr <= 0:
            raise ConfigError(f"optim.bert_lr: must be > 0, got {self.optim.bert_lr}")
        if self.optim.bert_weight_decay < 0:
            raise ConfigError(f"optim.bert_weight_decay: must be >= 0, got {self.optim.bert_weight_decay}")


# Per-dataset presets (documented defaults; every value can be overridden). The widths of
# the inputs come from the data file, not from here.
PRESETS: dict[str, dict[str, Any]] = {
    "synthetic": {
        # MOSI's shapes (50x768 / 375x5 / 500x20) and valid/test sizes, but 6,000 training clips:
        # with MOSI's 1,284 the model stayed just under 85% Non0_acc_2 after 30-45 epochs
        # (84.3-84.9% measured), and more clips per epoch learn faster per CPU second.
        "data": {"synthetic_n_train": 6000},
        "model": {"d_model": 48, "n_layers": 2, "d_state": 8, "dropout": 0.1, "align_lambda": 0.1},
        "optim": {"lr": 3e-3, "weight_decay": 1e-4},
        "train": {"epochs": 12, "patience": 5},
    },
    "mosi": {
        "model": {"d_model": 64, "n_layers": 2, "d_state": 16, "dropout": 0.2, "align_lambda": 0.1},
        "optim": {"lr": 1e-3, "weight_decay": 1e-4},
        "train": {"epochs": 40, "patience": 8, "seeds": [1111, 1112, 1113, 1114, 1115]},
    },
    "mosei": {
        "model": {"d_model": 96, "n_layers": 3, "d_state": 16, "dropout": 0.1, "align_lambda": 0.1},
        "optim": {"lr": 5e-4, "weight_decay": 1e-4},
        "train": {"epochs": 30, "patience": 8, "seeds": [1111, 1112, 1113, 1114, 1115]},
    },
}


def resolve_config(dataset: str | None = None, config_file: str | None = None,
                   overrides: list[str] | None = None, **flags: Any) -> ExperimentConfig:
    """Layer preset <- config file <- CLI flags <- ``--set`` overrides, strictly typed."""
    base: dict[str, Any] = {}
    file_data: dict[str, Any] = load_file(config_file) if config_file else {}
    name = dataset or file_data.get("data", {}).get("dataset") or "synthetic"
    if name not in PRESETS:
        raise ConfigError(f"--dataset: unknown dataset '{name}' (known: {', '.join(PRESETS)})")
    base = merge_dicts(base, PRESETS[name])
    base = merge_dicts(base, file_data)
    base = merge_dicts(base, {"data": {"dataset": name}})
    flag_map = {"data": "data.path", "out": "train.out", "seeds": "train.seeds", "epochs": "train.epochs",
                "device": "train.device", "quiet": "train.quiet", "model": "model.model",
                "seed_parallel": "train.seed_parallel", "cuda_graphs": "train.cuda_graphs",
                "deterministic": "train.deterministic",
                "missing_protocol": "data.missing_protocol", "missing_rate": "data.missing_rate",
                "text_encoder": "model.text_encoder", "bert_path": "model.bert_path"}
    for k, v in flags.items():
        if v is None:
            continue
        sec, key = flag_map[k].split(".")
        base = merge_dicts(base, {sec: {key: v}})
    cfg = from_dict(ExperimentConfig, base, "config")
    cfg = apply_overrides(cfg, overrides)
    cfg.validate()
    return cfg


def resume_config(run_dir: str | os.PathLike, quiet: bool | None = None) -> ExperimentConfig:
    """The config of the run in ``run_dir`` (its config.json), for ``train --resume``."""
    d = Path(run_dir)
    if not d.is_dir():
        raise ConfigError(f"--resume {d}: no such directory")
    p = d / "config.json"
    if not p.is_file():
        raise ConfigError(f"--resume {d}: no config.json (the run never started; start it again without --resume)")
    cfg = from_dict(ExperimentConfig, load_file(p), str(p))
    cfg.validate()
    cfg.train.out = str(d)  # the directory may have moved since
    if quiet is not None:
        cfg.train.quiet = quiet
    return cfg


# ------------------------------------------------------------------ helpers

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: invalid device '{name}'") from None


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


NO_DECAY_SUFFIXES = ("bias", "A_log", "D")


BERT_PREFIX = ".encoders.text.bert."  # the fine-tuned BERT of text_encoder.py (model.text_encoder=bert)


def param_groups(model: nn.Module, weight_decay: float, bert_lr: float | None = None,
                 bert_weight_decay: float = 0.01) -> list[dict[str, Any]]:
    """Optimizer groups chosen by parameter name and tag, never by index: no weight
    decay on biases, normalisation weights, embeddings/missing tokens, the SSM's A_log and D
    (and anything tagged ``_no_weight_decay``). With ``bert_lr``, the parameters of a BERT
    text encoder (``encoders.text.bert.*``) form two more groups with that learning rate and
    ``bert_weight_decay`` (not on its biases and LayerNorms). Frozen parameters are left out."""
    decay, no_decay = [], []
    bert_decay, bert_no_decay = [], []
    norm_types = (nn.LayerNorm,)
    norm_params = {id(p) for m in model.modules() if isinstance(m, norm_types) or "Norm" in type(m).__name__
                   for p in m.parameters(recurse=False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        skip_decay = (leaf in NO_DECAY_SUFFIXES or getattr(p, "_no_weight_decay", False) or id(p) in norm_params
                      or ".missing." in f".{name}" or ".mod_emb." in f".{name}" or p.ndim < 2)
        if bert_lr is not None and BERT_PREFIX in f".{name}":
            (bert_no_decay if skip_decay else bert_decay).append(p)
        else:
            (no_decay if skip_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if bert_decay or bert_no_decay:
        groups += [{"params": bert_decay, "weight_decay": bert_weight_decay, "lr": bert_lr},
                   {"params": bert_no_decay, "weight_decay": 0.0, "lr": bert_lr}]
    return groups


def make_optimizer(model: nn.Module, oc: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer of ``oc`` over :func:`param_groups`. ``fused``: the single-kernel CUDA
    implementation (all parameters must be on CUDA); the same update up to rounding."""
    groups = param_groups(model, oc.weight_decay, oc.bert_lr, oc.bert_weight_decay)
    kw = {"fused": True} if fused else {}
    if oc.name == "sgd":
        return torch.optim.SGD(groups, lr=oc.lr, momentum=oc.momentum, **kw)
    cls = torch.optim.AdamW if oc.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=oc.lr, betas=tuple(oc.betas), **kw)


def make_scheduler(opt: torch.optim.Optimizer, oc: OptimConfig, epochs: int, steps_per_epoch: int):
    """Per-step schedulers (cosine / none with warm-up) or per-epoch ones (step / plateau)."""
    if oc.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=oc.gamma, patience=2)
    if oc.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=oc.step_size, gamma=oc.gamma)
    total = max(1, epochs * steps_per_epoch)
    warm = min(total - 1, oc.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if oc.scheduler == "none":
            return 1.0
        prog = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, prog)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device``. Host tensors bound for CUDA are pinned first: a copy
    from pageable memory synchronises the stream (the CPU would wait for the GPU at every
    tensor); from pinned memory it is truly asynchronous."""
    pin = device.type == "cuda"

    def move(t: torch.Tensor) -> torch.Tensor:
        if pin and t.device.type == "cpu":
            t = t.pin_memory()
        return t.to(device, non_blocking=True)

    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = {m: move(t) for m, t in v.items()}
        elif isinstance(v, torch.Tensor):
            out[k] = move(v)
        else:
            out[k] = v
    return out


def task_loss(pred: torch.Tensor, label: torch.Tensor, mcfg: AlignMambaConfig, loss: str) -> torch.Tensor:
    if mcfg.task == "classification":
        return F.cross_entropy(pred.float(), label.long())
    pred = pred.float()
    return F.l1_loss(pred, label.float()) if loss == "l1" else F.mse_loss(pred, label.float())


def forward_batch(model: nn.Module, batch: dict[str, Any], return_plans: bool = False):
    kw = {"text_bert": batch.get("text_bert")} if _uses_bert(model) else {}
    return model(batch["features"], batch["masks"], present=batch.get("present"), return_plans=return_plans, **kw)


def _uses_bert(model: nn.Module) -> bool:
    """Whether ``model`` (or the module a DDP wrapper holds) encodes text with BERT from text_bert."""
    cfg = getattr(getattr(model, "module", model), "config", None)
    return getattr(cfg, "text_encoder", "features") == "bert"


class Progress:
    """A dependency-free progress line on stderr (only when it is a terminal and not quiet).

    The loss shown is read from the device every ``every`` steps and at the last step only
    (reading it is a host sync), so the number lags the step counter in between."""

    def __init__(self, total: int, desc: str, enabled: bool, every: int = 20):
        self.total, self.desc, self.n, self.every = total, desc, 0, every
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.time()
        self.loss = float("nan")

    def update(self, loss: torch.Tensor | float) -> None:
        self.n += 1
        if self.enabled:
            if self.n == 1 or self.n % self.every == 0 or self.n >= self.total:
                self.loss = float(loss)
            rate = self.n / max(1e-9, time.time() - self.t0)
            sys.stderr.write(f"\r{self.desc} {self.n}/{self.total} loss {self.loss:.4f} ({rate:.1f} it/s)   ")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 70 + "\r")
            sys.stderr.flush()


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: Iterable, mcfg: AlignMambaConfig, device: torch.device,
                   loss: str = "l1", amp: bool = False) -> dict[str, Any]:
    """Run ``model`` over ``loader``; returns loss, metrics and per-sample predictions."""
    model.eval()
    preds, labels, index = [], [], []
    # the loss sum and the predictions stay on the device until the loop ends: one host sync
    # per evaluation instead of several per batch (float64 sums: the host's float arithmetic)
    total: torch.Tensor | float = 0.0
    count = 0
    for batch in loader:
        labels.append(batch["label"].cpu())  # the loader's host copies, before the move
        index.append(batch["index"].cpu())
        batch = to_device(batch, device)
        with _autocast(device, amp):
            out = forward_batch(model, batch)
        lt = task_loss(out.pred, batch["label"], mcfg, loss)
        n = batch["label"].shape[0]
        total = total + lt.detach().double() * n
        count += n
        preds.append(out.pred.detach().float())
    pred = torch.cat(preds).cpu() if preds else torch.zeros(0)
    label = torch.cat(labels) if labels else torch.zeros(0)
    idx = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
    mean_loss = float(total) / max(1, count)
    if D.get_env().world > 1:
        # every process evaluated its shard (distributed.shard_sampler): put the whole split
        # together, each sample once, and make rank 0's loss and metrics everybody's
        pred, label, idx = D.gather_by_index(pred, label, idx)
        mean_loss = float(task_loss(pred, label, mcfg, loss)) if len(label) else 0.0
        mean_loss, metrics = D.broadcast((mean_loss, compute_metrics(pred, label, mcfg)))
    else:
        metrics = compute_metrics(pred, label, mcfg)
    return {"loss": mean_loss, "pred": pred, "label": label, "index": idx, "metrics": metrics}


def compute_metrics(pred: torch.Tensor, label: torch.Tensor, mcfg: AlignMambaConfig) -> dict[str, float]:
    if len(label) == 0:
        return {}
    if mcfg.task == "classification":
        return classification_metrics(pred.argmax(-1).numpy(), label.long().numpy(), mcfg.num_classes)
    return msa_metrics(pred.numpy(), label.numpy())


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# ------------------------------------------------------------------ data

def load_experiment_data(cfg: ExperimentConfig):
    """The dataset the config names: a file (MMSA / MulT) or the synthetic default."""
    from .data import load_dataset, load_mmsa
    from .data.synthetic import make_synthetic

    dc = cfg.data
    if dc.path:
        ds = load_dataset(dc.path)
    elif dc.dataset == "synthetic":
        raw = make_synthetic(like=dc.synthetic_like, aligned=dc.synthetic_aligned, seed=dc.synthetic_seed,
                             n_train=dc.synthetic_n_train, n_valid=dc.synthetic_n_valid,
                             n_test=dc.synthetic_n_test)
        ds = load_mmsa(raw, f"synthetic:{dc.synthetic_like}", inplace=True)
    else:
        raise ConfigError(f"--data: dataset '{dc.dataset}' needs a feature file (--data FILE); "
                          "see README 'Data' for where MOSI/MOSEI files come from")
    check_nonfinite(ds, dc.nonfinite)
    return ds


def check_nonfinite(ds, policy: str) -> None:
    """``data.nonfinite``: "refuse" a file whose features held inf/NaN (the loaders count
    them in ``ds.sanitized`` per "split/modality"), or "sanitize": one warning with the counts."""
    from .errors import DataError

    counts = dict(getattr(ds, "sanitized", None) or {})
    if not counts:
        return
    total = sum(counts.values())
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    if policy == "refuse":
        raise DataError(f"{ds.source}: {total} inf/NaN feature values ({detail}) and data.nonfinite=refuse")
    _warn_once(f"{ds.source}: {total} inf/NaN feature values set to 0 ({detail}); "
               "data.nonfinite=refuse refuses such files instead")


def fit_model_config(mcfg: AlignMambaConfig, ds) -> AlignMambaConfig:
    """Take the modality names and input widths from the data."""
    mcfg = copy.deepcopy(mcfg)
    mods = list(ds.modalities)
    dims = dict(ds.input_dims)
    if sorted(mods) != sorted(mcfg.modalities):
        mcfg.modalities = mods
        mcfg.interleave_order = [m for m in mcfg.interleave_order if m in mods] + \
                                [m for m in mods if m not in mcfg.interleave_order]
        if mcfg.anchor not in mods:
            raise ConfigError(f"model.anchor: '{mcfg.anchor}' is not a modality of the data ({mods})")
    mcfg.input_dims = {m: int(dims[m]) for m in mcfg.modalities}
    mcfg.validate()
    return mcfg


def make_loaders(cfg: ExperimentConfig, ds, seed: int, rank: int = 0, world: int = 1):
    from .data import make_loader

    mc = cfg.model
    kw = {"task": mc.task, "num_classes": mc.num_classes}
    # data.batch_size is the global batch. The training order comes from a DistributedSampler
    # in one process too, so W processes train on exactly the single-process batches.
    per_rank = D.per_rank_batch(cfg.data.batch_size, world)
    sp = ds.splits
    train = make_loader(sp["train"], per_rank, shuffle=False, seed=seed,
                        sampler=D.train_sampler(len(sp["train"]), seed, rank, world), **kw)
    valid = make_loader(sp["valid"], cfg.data.eval_batch_size, shuffle=False, seed=seed,
                        sampler=D.shard_sampler(len(sp["valid"]), rank, world), **kw)
    test = make_loader(sp["test"], cfg.data.eval_batch_size, shuffle=False, seed=seed,
                       sampler=D.shard_sampler(len(sp["test"]), rank, world), **kw)
    return train, valid, test


# ------------------------------------------------------------------ the loop

@contextlib.contextmanager
def deterministic_mode(on: bool) -> Iterator[None]:
    """``train.deterministic``: ``torch.use_deterministic_algorithms(True)``, cuDNN's
    deterministic algorithms and no autotuning for the duration, then the previous settings.

    cuBLAS needs a fixed workspace configuration for repeatable matmuls:
    CUBLAS_WORKSPACE_CONFIG=:4096:8 is set when the environment has none (it stays set)."""
    if not on:
        yield
        return
    cudnn = torch.backends.cudnn
    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(), cudnn.deterministic,
            cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        cudnn.deterministic, cudnn.benchmark = prev[2], prev[3]


def train_one_seed(cfg: ExperimentConfig, ds, seed: int, out_dir: Path, log=print,
                   resume: bool = False) -> dict[str, Any]:
    """Train, select on validation loss, reload the best weights, test. Returns the seed's record.

    ``out_dir/last`` is saved after every epoch; with ``resume`` training continues from it
    and ends with exactly the metrics of an uninterrupted run (on CPU; on CUDA too with
    ``train.deterministic``).
    """
    with deterministic_mode(cfg.train.deterministic):
        return _train_one_seed(cfg, ds, seed, out_dir, log, resume)


def _train_one_seed(cfg: ExperimentConfig, ds, seed: int, out_dir: Path, log, resume: bool
                    ) -> dict[str, Any]:
    from . import train_state as ts

    tc, oc = cfg.train, cfg.optim
    env = D.get_env()  # rank / world / device under torchrun (distributed.setup), else 0 / 1
    device = env.device if env.active else pick_device(tc.device)
    set_seed(seed)
    mcfg = fit_model_config(cfg.model, ds)
    model = build_model(mcfg).to(device)
    train_loader, valid_loader, test_loader = make_loaders(cfg, ds, seed, env.rank, env.world)
    amp = tc.amp and device.type == "cuda"
    missing = _missing_sampler(cfg, seed)
    graphed = None  # graphs.GraphedTrainStep when train.cuda_graphs is on and usable
    if tc.cuda_graphs:
        from . import graphs as G
        why = G.graphs_unsupported_reason(device, env.world, missing is not None, _uses_bert(model))
        if why is None:
            dev_train = G.DeviceSplit(ds.splits["train"], device, mcfg.task, mcfg.num_classes)
            graphed = G.GraphedTrainStep(model, mcfg.modalities,
                                         lambda pred, label: task_loss(pred, label, mcfg, tc.loss),
                                         amp, batch_size=train_loader.batch_size)
        else:
            G.warn_once(f"train.cuda_graphs: {why}; using the eager training step")
    opt = make_optimizer(model, oc, fused=graphed is not None)
    sched = make_scheduler(opt, oc, tc.epochs, len(train_loader))
    per_step = oc.scheduler in ("cosine", "none")

    out_dir.mkdir(parents=True, exist_ok=True)
    best_dir = out_dir / "best"
    extra = {"experiment": to_dict(cfg), "seed": seed}
    loop = None
    if resume:
        with D.main_first():  # rank 0 repairs an interrupted last/ before the others read it
            loop = ts.load_last(out_dir, model, opt, sched, train_loader, missing, extra["experiment"])
        if loop is not None:
            log(f"seed {seed}: resuming after epoch {loop['epoch']} ({out_dir / ts.LAST})")
    elif env.is_main:
        ts.clear_seed_dir(out_dir)
    if loop is None:
        loop = {"epoch": 0, "best_loss": math.inf, "best_epoch": -1, "bad_epochs": 0, "rows": [],
                "stop_reason": None}
    rows: list[dict[str, Any]] = loop["rows"]
    best_loss, best_epoch, bad_epochs = loop["best_loss"], loop["best_epoch"], loop["bad_epochs"]
    stop_reason = loop["stop_reason"] or "max_epochs"
    first_epoch = loop["epoch"] + 1 if loop["stop_reason"] is None else tc.epochs + 1
    if env.rank > 0:  # own dropout / missing-modality streams per rank (last/ holds rank 0's)
        stream = D.rank_seed(D.SEED_STRIDE * seed + first_epoch, env.rank)
        torch.manual_seed(stream)
        missing = _missing_sampler(cfg, stream)
    # DistributedDataParallel under torchrun, ``model`` itself otherwise; checkpoints and
    # evaluation always use the unwrapped ``model``
    net = D.wrap_model(model, lambda m: forward_batch(m, to_device(D.first_batch(train_loader), device)),
                       varying_graph=missing is not None)
    for epoch in range(first_epoch, tc.epochs + 1):
        ts.reseed_epoch(train_loader, seed, epoch)
        D.set_epoch(train_loader, epoch)  # the training permutation depends on (seed, epoch) only
        model.train()
        t0 = time.time()
        prog = Progress(len(train_loader), f"seed {seed} epoch {epoch}", not tc.quiet and env.is_main)
        # (loss, task, align) * n summed on the device in float64 (the same arithmetic as
        # Python floats) and read once per epoch: reading them per step would be 3 host syncs
        sums_dev: torch.Tensor | None = None
        n_seen, step = 0, 0
        batches = (dev_train.batches(list(train_loader.sampler), train_loader.batch_size)
                   if graphed is not None else train_loader)
        for batch in batches:
            step += 1
            if graphed is not None:  # already on the device, padded to the split's lengths
                lt, la = graphed(batch)
            else:
                if missing is not None:
                    batch = missing(batch)
                batch = to_device(batch, device)
                with _autocast(device, amp):
                    out = forward_batch(net, batch)
                lt = task_loss(out.pred, batch["label"], mcfg, tc.loss)
                la = out.align_loss.float()
            loss = lt + la
            # backward and clipping are queued before the step's one host sync (the finiteness
            # check), so the CPU launches them while the GPU still runs the forward; a
            # non-finite step's gradients are then discarded
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if oc.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip)
            if not D.all_ok(bool(torch.isfinite(loss))):  # all ranks skip / stop together
                msg = f"seed {seed} epoch {epoch} step {step}: non-finite loss ({float(loss)})"
                opt.zero_grad(set_to_none=True)
                if tc.on_nonfinite_loss == "skip":
                    log(f"warning: {msg}; step skipped")
                    continue
                log(f"error: {msg}; stopping, best checkpoint kept")
                stop_reason = "nonfinite_loss"
                break
            opt.step()
            if per_step:
                sched.step()
            n = batch["label"].shape[0]
            n_seen += n
            part = torch.stack([loss.detach(), lt.detach(), la.detach()]).double() * n
            sums_dev = part if sums_dev is None else sums_dev + part
            prog.update(loss.detach())
        prog.close()
        if stop_reason == "nonfinite_loss":
            break
        sums = dict(zip(("loss", "task", "align"), sums_dev.tolist() if sums_dev is not None else [0.0] * 3))
        # epoch means over the samples of every rank (with the training sampler's padding)
        sums["loss"], sums["task"], sums["align"], n_seen = D.sum_across(
            [sums["loss"], sums["task"], sums["align"], n_seen])
        val = evaluate_model(model, valid_loader, mcfg, device, tc.loss, amp)
        if oc.scheduler == "plateau":
            sched.step(val["loss"])
        elif oc.scheduler == "step":
            sched.step()
        row = {"epoch": epoch, "train_loss": sums["loss"] / max(1, n_seen),
               "train_task_loss": sums["task"] / max(1, n_seen), "train_align_loss": sums["align"] / max(1, n_seen),
               "valid_loss": val["loss"], **{f"valid_{k}": v for k, v in val["metrics"].items()},
               "lr": opt.param_groups[0]["lr"], "seconds": time.time() - t0}
        rows.append(row)
        improved = val["loss"] < best_loss
        if improved:
            best_loss, best_epoch, bad_epochs = val["loss"], epoch, 0
            if env.is_main:
                ts.stage_best(out_dir, model, extra, epoch)  # becomes best/ once last/ names it
        else:
            bad_epochs += 1
        key = "valid_Non0_acc_2" if mcfg.task == "regression" else "valid_Acc"
        log(f"seed {seed} epoch {epoch:3d}  train {row['train_loss']:.4f} (align {row['train_align_loss']:.4f})  "
            f"valid {val['loss']:.4f}  {key[6:]} {row.get(key, float('nan')):.4f}  "
            f"{row['seconds']:.1f}s{'  *' if improved else ''}")
        stopping = D.broadcast(bad_epochs >= tc.patience)  # every rank stops together
        if env.is_main:  # only rank 0 writes
            _write_log(out_dir / "log.csv", rows)
            ts.save_last(out_dir, model, opt, sched, train_loader, missing,
                         {"epoch": epoch, "best_loss": best_loss, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                          "rows": rows, "stop_reason": "early_stopping" if stopping else None}, extra)
            if improved:
                ts.commit_best(out_dir)
        if stopping:
            stop_reason = "early_stopping"
            break
    if best_epoch < 0:
        raise AlignMambaError(f"seed {seed}: training produced no usable checkpoint (loss was never finite)")
    from .checkpoint import load_checkpoint
    D.barrier()  # rank 0 has committed best/
    best = load_checkpoint(best_dir, device)
    val = evaluate_model(best, valid_loader, mcfg, device, tc.loss, amp)
    test = evaluate_model(best, test_loader, mcfg, device, tc.loss, amp)
    if env.is_main:
        _write_predictions(out_dir / "test_predictions.csv", test)
        _plot_curves(out_dir / "curves.png", rows, mcfg)
    record = {"seed": seed, "best_epoch": best_epoch, "epochs_run": len(rows), "stop_reason": stop_reason,
              "valid_loss": val["loss"], "valid": val["metrics"], "test_loss": test["loss"], "test": test["metrics"],
              "checkpoint": str(best_dir)}
    if env.is_main:
        atomic_write_json(out_dir / ts.RESULT, record)  # marks the seed finished for --resume
    return record


def _missing_sampler(cfg: ExperimentConfig, seed: int):
    """Training-time missing-modality augmentation (``data.missing_protocol``), or None."""
    if cfg.data.missing_protocol == "none":
        return None
    from .missing import TrainingMissingSampler
    return TrainingMissingSampler(cfg.data.missing_protocol, cfg.data.missing_rate,
                                  cfg.model.modalities, seed)


def _write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _write_predictions(path: Path, res: dict[str, Any]) -> None:
    buf = io.StringIO()
    buf.write("index,prediction,label\n")
    pred = res["pred"]
    for i, p, y in zip(res["index"].tolist(), pred.tolist(), res["label"].tolist()):
        ps = p if not isinstance(p, list) else int(np.argmax(p))
        buf.write(f"{i},{ps},{y}\n")
    atomic_write_text(path, buf.getvalue())


def _plot_curves(path: Path, rows: list[dict[str, Any]], mcfg: AlignMambaConfig) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _warn_once("matplotlib is not installed: training curves (PNG) are not drawn "
                   "(pip install matplotlib)")
        return
    ep = [r["epoch"] for r in rows]
    key = "valid_Non0_acc_2" if mcfg.task == "regression" else "valid_Acc"
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(ep, [r["train_loss"] for r in rows], label="train (task + align)")
    ax[0].plot(ep, [r["valid_loss"] for r in rows], label="valid (task)")
    ax[0].set_xlabel("epoch"); ax[0].set_ylabel("loss"); ax[0].legend()
    ax[1].plot(ep, [r.get(key, float("nan")) for r in rows], color="C2")
    ax[1].set_xlabel("epoch"); ax[1].set_ylabel(key)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    from .checkpoint import atomic_write_bytes
    atomic_write_bytes(path, buf.getvalue())


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, stacklevel=2)


def summarize(seed_rows: list[dict[str, Any]], key: str = "test") -> tuple[dict[str, float], dict[str, float]]:
    """Mean and (population, as MMSA reports) standard deviation over seeds of each metric."""
    names = list(seed_rows[0][key]) if seed_rows else []
    mean = {k: float(np.mean([r[key][k] for r in seed_rows])) for k in names}
    std = {k: float(np.std([r[key][k] for r in seed_rows])) for k in names}
    return mean, std


def format_table(mean: dict[str, float], std: dict[str, float], title: str = "test") -> str:
    lines = [f"{title:<16}{'mean':>10}{'std':>10}"]
    for k, v in mean.items():
        scale = 100.0 if ("acc" in k.lower() or "f1" in k.lower()) else 1.0
        lines.append(f"{k:<16}{v * scale:>10.2f}{std[k] * scale:>10.2f}")
    return "\n".join(lines)


def run_experiment(cfg: ExperimentConfig, log=print, resume: bool = False) -> dict[str, Any]:
    """Train every seed of ``cfg.train.seeds``; write config.json, metrics.json; return metrics.

    ``resume``: seeds with a ``result.json`` are reused, the others continue from ``last/``.
    Under torchrun every process calls this; only rank 0 prints and writes (docs/DISTRIBUTED.md).
    """
    env = D.setup(cfg.train.device, cfg.data.batch_size)  # joins torchrun's process group, if any
    if not env.is_main:
        log = D.silent
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    ds = load_experiment_data(cfg)
    out = Path(cfg.train.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    cfg.model = fit_model_config(cfg.model, ds)
    if env.is_main:
        atomic_write_json(out / "config.json", to_dict(cfg))
    if not resume and env.is_main:
        # a new run in an old directory: no seed of it may later pass for one of this run
        from .train_state import clear_seed_dir
        for seed in cfg.train.seeds:
            clear_seed_dir(out / f"seed_{seed}")
    rows = []
    parallel = D.seed_parallel_active(cfg)
    if parallel:  # one worker process per seed (per GPU); the same aggregation below
        rows = D.run_seeds_parallel(cfg, out, log=log, resume=resume)
    for seed in ([] if parallel else cfg.train.seeds):
        seed_dir = out / f"seed_{seed}"
        if resume:
            from .train_state import RESULT, read_result
            done = read_result(seed_dir, seed)
            if done is not None:
                log(f"seed {seed}: already finished ({seed_dir / RESULT})")
                rows.append(done)
                continue
        rows.append(train_one_seed(cfg, ds, seed, seed_dir, log=log, resume=resume))
    mean, std = summarize(rows)
    vmean, vstd = summarize(rows, "valid")
    metrics = {"model": cfg.model.model, "dataset": cfg.data.dataset, "data": ds.source,
               "test": mean, "test_std": std, "valid": vmean, "valid_std": vstd, "seeds": rows}
    if env.is_main:
        atomic_write_json(out / "metrics.json", metrics)
    log("")
    log(f"{cfg.model.model} on {ds.source}: {len(rows)} seed(s) {list(cfg.train.seeds)}")
    log(format_table(mean, std, "test metric"))
    log(f"results in {out}")
    return metrics
