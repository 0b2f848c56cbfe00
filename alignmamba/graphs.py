"""Fast CUDA training step: static-shape batches and a CUDA-graphed forward + backward.

At MOSI's size (batch 32, d 48) a training step is a few hundred tiny kernels, so an eager
step is bound by the CPU launching them, not by the GPU running them. With
``train.cuda_graphs=true`` (train.py) the training step becomes:

* data: the whole training split lives on the device once, zero-padded to the split's
  longest real length per modality (:class:`DeviceSplit`); a batch is an index gather in the
  order of the loop's sampler, so no host collation or host-to-device copy per step;
* forward + backward: :class:`StepLoss` maps flat tensors (features and masks per modality,
  labels) to (task loss, lambda L_align) (eq. 12); :class:`GraphedTrainStep` captures it with
  ``torch.cuda.make_graphed_callables``, so the forward is one graph replay and the backward
  another. Shapes must be static: batches of the captured shape replay the graphs, any other
  shape (the last, partial batch of an epoch) runs the same module eagerly on the same
  parameters;
* the optimizer (fused AdamW), gradient clipping and the scheduler stay outside the graphs.

For inference, :class:`GraphedForward` replays a model's forward from one CUDA graph per input
shape (a batch-1 forward at 64k tokens is ~300 launches: host-bound when eager).

Padding is inert: masks zero the encoders' padded tokens, OT never sends mass to or from a
padded token (eq. 5), MMD averages over valid tokens (eq. 8), the Mamba scan is causal and
padding sits at the back, and pooling is over valid positions. So a batch padded to the
split's maximum lengths gives the loss and gradients of the trimmed batch
(tests/test_graphs.py checks this on CPU in fp32).
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError

__all__ = ["DeviceSplit", "GraphedForward", "GraphedTrainStep", "StepLoss", "capture_graph",
           "graphs_unsupported_reason", "pad_batch", "split_max_lengths", "warn_once"]

_warned: set[str] = set()


def warn_once(msg: str) -> None:
    """``warnings.warn(msg)`` the first time this exact message comes up in the process."""
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def graphs_unsupported_reason(device: torch.device, world: int = 1, missing: bool = False,
                              bert: bool = False) -> str | None:
    """Why ``train.cuda_graphs`` cannot be used for this run (None: it can).

    Graphs need CUDA; DDP (its gradient hooks), missing-modality training (``present`` and
    a per-batch sampler on the host) and the BERT text encoder (token ids) use the eager step.
    """
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device (training on {device})"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if world > 1:
        return "CUDA graphs are not used under DDP (several processes)"
    if missing:
        return "CUDA graphs are not used with missing-modality training (data.missing_protocol)"
    if bert:
        return "CUDA graphs are not used with the BERT text encoder (model.text_encoder=bert)"
    return None


# ------------------------------------------------------------------ static-shape batches

def split_max_lengths(split: Any) -> dict[str, int]:
    """Longest real length per modality of a ``MultimodalSplit`` (the static T_m of its batches)."""
    return {m: int(split.lengths[m].max()) for m in split.modalities}


def pad_batch(batch: dict[str, Any], lengths: dict[str, int]) -> dict[str, Any]:
    """Zero-pad a collated batch along time: features (B, T_m, d_m) -> (B, L_m, d_m), masks
    (B, T_m) -> (B, L_m) with False; other entries are shared. Needs L_m >= T_m."""
    feats, masks = {}, {}
    for m, x in batch["features"].items():
        t, want = x.shape[1], int(lengths[m])
        if want < t:
            raise ConfigError(f"pad_batch: lengths[{m!r}]={want} is shorter than the batch's {t} steps")
        feats[m] = torch.nn.functional.pad(x, (0, 0, 0, want - t))
        masks[m] = torch.nn.functional.pad(batch["masks"][m], (0, want - t), value=False)
    return {**batch, "features": feats, "masks": masks}


class DeviceSplit:
    """A training split held on ``device`` once, padded to the split's max real lengths.

    ``features[m]`` (N, L_m, d_m) float32 (zero beyond each sample's length, as the loaders
    guarantee), ``masks[m]`` (N, L_m) bool, ``labels`` (N,) float32 or int64 (classification,
    the mapping of ``SplitDataset``). :meth:`batches` yields batch dicts in the layout of
    docs/ARCHITECTURE.md (without text_bert), gathered on the device by index.
    """

    def __init__(self, split: Any, device: torch.device | str, task: str = "regression",
                 num_classes: int | None = None) -> None:
        from .data.dataset import SplitDataset

        self.device = torch.device(device)
        self.modalities: list[str] = list(split.modalities)
        self.lengths = split_max_lengths(split)
        self.n = len(split)
        self.features: dict[str, Tensor] = {}
        self.masks: dict[str, Tensor] = {}
        for m in self.modalities:
            L = self.lengths[m]
            self.features[m] = torch.from_numpy(split.features[m][:, :L]).to(self.device).contiguous()
            ln = torch.from_numpy(split.lengths[m]).to(self.device)
            self.masks[m] = torch.arange(L, device=self.device)[None, :] < ln[:, None]
        targets = SplitDataset(split, task=task, num_classes=num_classes).targets
        self.labels = torch.from_numpy(targets).to(self.device)

    def batch(self, index: Tensor) -> dict[str, Any]:
        """The samples ``index`` ((B,) int64 on the device), padded to the split's lengths."""
        return {"features": {m: self.features[m].index_select(0, index) for m in self.modalities},
                "masks": {m: self.masks[m].index_select(0, index) for m in self.modalities},
                "label": self.labels.index_select(0, index), "index": index}

    def batches(self, order: Sequence[int], batch_size: int) -> Iterator[dict[str, Any]]:
        """Consecutive batches of ``batch_size`` over ``order`` (a sampler's indices; the last
        batch may be smaller), exactly as a DataLoader with that sampler batches them.
        One host-to-device copy of ``order`` per call."""
        if batch_size < 1:
            raise ConfigError(f"DeviceSplit.batches: batch_size must be >= 1, got {batch_size}")
        idx = torch.as_tensor(list(order), dtype=torch.int64).to(self.device)
        for k in range(0, idx.shape[0], batch_size):
            yield self.batch(idx[k:k + batch_size])


# ------------------------------------------------------------------ the graphed step

class StepLoss(nn.Module):
    """One training forward on flat tensors, for graph capture.

    forward(*features (B, L_m, d_m) per modality, *masks (B, L_m) per modality, label (B,))
      -> (task loss, lambda L_align), fp32 scalars (eq. 12 is their sum).
    ``loss_fn(pred, label)`` is the task loss. With ``amp`` the model runs under bf16 autocast
    with the cast cache off (a cache would keep casts from capture time inside the graph).
    """

    def __init__(self, model: nn.Module, modalities: Sequence[str],
                 loss_fn: Callable[[Tensor, Tensor], Tensor], amp: bool = False) -> None:
        super().__init__()
        self.model = model
        self.modalities = list(modalities)
        self.loss_fn = loss_fn
        self.amp = amp
        # set by GraphedTrainStep around the capture: the outputs of the last call, so that the
        # captured forward's autograd graph can be released afterwards

    def flat(self, batch: dict[str, Any]) -> tuple[Tensor, ...]:
        """The forward's positional arguments from a batch dict."""
        return (*(batch["features"][m] for m in self.modalities),
                *(batch["masks"][m] for m in self.modalities), batch["label"])

    def forward(self, *flat: Tensor) -> tuple[Tensor, Tensor]:
        k = len(self.modalities)
        feats = dict(zip(self.modalities, flat[:k]))
        masks = dict(zip(self.modalities, flat[k:2 * k]))
        label = flat[2 * k]
        dev = label.device.type
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.amp and dev == "cuda",
                            cache_enabled=False):
            out = self.model(feats, masks)
        return self.loss_fn(out.pred, label), out.align_loss.float()


class GraphedTrainStep:
    """(task loss, align loss) of a batch, with forward and backward as CUDA graph replays.

    ``step(batch)`` returns the two fp32 scalars of :class:`StepLoss`; ``(lt + la).backward()``
    then fills the parameters' ``.grad``. The first batch of ``batch_size`` samples on CUDA
    triggers the capture (``warmup_iters`` forward/backward passes on a side stream first,
    which leave ``.grad`` and the parameters untouched). Batches of the captured shapes replay
    the graphs; others, and any call while the model is in eval mode or not on CUDA, run
    :class:`StepLoss` eagerly on the same parameters. ``replays`` / ``eager_steps`` count both.
    """

    def __init__(self, model: nn.Module, modalities: Sequence[str],
                 loss_fn: Callable[[Tensor, Tensor], Tensor], amp: bool = False,
                 batch_size: int | None = None, warmup_iters: int = 3) -> None:
        self.model = model
        self.eager = StepLoss(model, modalities, loss_fn, amp)
        # a second wrapper over the same model: make_graphed_callables replaces the forward of
        # the module it is given, the eager one must stay callable for other shapes
        self._to_graph = StepLoss(model, modalities, loss_fn, amp)
        self.batch_size = batch_size
        self.warmup_iters = warmup_iters
        self._graphed: Callable[..., tuple[Tensor, Tensor]] | None = None
        self._shapes: tuple[tuple[tuple[int, ...], torch.dtype], ...] | None = None
        self.replays = 0
        self.eager_steps = 0

    @property
    def captured(self) -> bool:
        return self._graphed is not None

    @staticmethod
    def _signature(flat: Sequence[Tensor]) -> tuple[tuple[tuple[int, ...], torch.dtype], ...]:
        return tuple((tuple(t.shape), t.dtype) for t in flat)

    def _capturable(self, flat: Sequence[Tensor]) -> bool:
        label = flat[-1]
        return (label.is_cuda and self.model.training
                and (self.batch_size is None or label.shape[0] == self.batch_size))

    def capture(self, batch: dict[str, Any]) -> None:
        """Capture the graphs on ``batch``'s shapes (its values are only used for warm-up).

        No autograd graph over the model's parameters may be alive at this point (e.g. the
        undetached loss of an earlier eager step): it keeps the parameters' ``AccumulateGrad``
        nodes, created on the stream of that step, and when that is the default stream the
        backward capture fails (cudaErrorStreamCaptureImplicit). train.py captures at the
        first full batch of the run, before any other step.
        """
        flat = self.eager.flat(batch)
        # the graph's static inputs: own buffers, refilled by copy at every replay
        sample = tuple(t.detach().clone() for t in flat)
        self._to_graph.train(self.model.training)
        # The graphed backward runs on the capture's side stream while the parameters'
        # AccumulateGrad nodes belong to the stream they were made on, so PyTorch warns once
        # per run that the streams differ. That is how make_graphed_callables works, not a
        # mistake here (graphed and eager gradients are tested equal on a GPU), and PyTorch's
        # own message names this switch for an intended mismatch. It is process-wide (PyTorch
        # has no getter to restore it); docs/ARCHITECTURE.md says so.
        set_warn = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch",
                           None)
        if set_warn is not None:
            set_warn(False)
        try:
            self._graphed = torch.cuda.make_graphed_callables(
                self._to_graph, sample, num_warmup_iters=self.warmup_iters, allow_unused_input=True)
        except RuntimeError as e:
            raise RuntimeError(
                "GraphedTrainStep: CUDA graph capture failed. If an autograd graph of an earlier "
                "step on these parameters is still referenced (an undetached loss), delete or "
                f"detach it before the first graphed step. Cause: {e}") from e
        self._shapes = self._signature(flat)

    def __call__(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        flat = self.eager.flat(batch)
        if self._graphed is None and self._capturable(flat):
            self.capture(batch)
        if self._graphed is not None and self.model.training and self._signature(flat) == self._shapes:
            self.replays += 1
            return self._graphed(*flat)
        self.eager_steps += 1
        return self.eager(*flat)


# ------------------------------------------------------------------ inference

def capture_failure(exc: BaseException) -> str:
    """One line on why a capture failed, for the warnings of the callers that then run eagerly:
    the exception's type and the first line of its message (cut to 120 characters)."""
    first = (str(exc).splitlines() or [""])[0][:120]
    return f"CUDA graph capture failed ({type(exc).__name__}{': ' + first if first else ''})"


def capture_graph(fn: Callable[[], Any], device: torch.device,
                  warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(graph, output) of ``fn()`` captured in a CUDA graph on ``device``.

    ``warmup`` calls run first on a side stream (lazy initialisation and kernel compiles must
    not happen during capture); ``graph.replay()`` then refills ``output``'s tensors. Raises
    whatever the capture raises (e.g. a host sync inside ``fn``), after a device sync.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn()
    except Exception:
        torch.cuda.synchronize(device)
        raise
    return graph, out


_Sig = tuple[tuple[str, tuple[int, ...], torch.dtype, torch.device], ...]


class GraphedForward:
    """``model(features, masks)`` for inference, replayed from one CUDA graph per input shape.

    ``g = GraphedForward(model)`` then ``out = g(features, masks)`` gives what the model
    returns under ``torch.inference_mode`` (and bf16 autocast with ``amp``). The first call
    with a new set of shapes, dtypes and devices captures the forward (:func:`capture_graph`);
    later calls with that signature copy their inputs into the graph's buffers and replay it.
    The returned tensors belong to the graph: the next call with the same signature
    overwrites them (clone what you keep). At most ``max_graphs`` captures are kept, the least
    recently used one is dropped (each holds its own memory pool). On the CPU, or when a
    capture fails (e.g. a host sync in the forward), calls run eagerly, with a warning once.
    The model must be in eval mode (no dropout in a replay). A replay reads the parameters'
    storage as it was at capture: load new weights in place (``load_state_dict``), and make a
    new GraphedForward after ``model.to(...)`` (which replaces the tensors).
    """

    def __init__(self, model: nn.Module, amp: bool = True, max_graphs: int = 4) -> None:
        if max_graphs < 1:
            raise ValueError(f"GraphedForward: max_graphs={max_graphs} must be >= 1")
        self.model = model
        self.amp = amp
        self.max_graphs = max_graphs
        # signature -> (graph, static features, static masks, output), or None: runs eagerly
        self._graphs: OrderedDict[_Sig, tuple[Any, dict, dict | None, Any] | None] = OrderedDict()
        self.replays = 0
        self.eager_calls = 0

    @staticmethod
    def _signature(features: dict[str, Tensor], masks: dict[str, Tensor] | None) -> _Sig:
        sig = [(f"f:{m}", tuple(x.shape), x.dtype, x.device) for m, x in sorted(features.items())]
        if masks is not None:
            sig += [(f"m:{m}", tuple(x.shape), x.dtype, x.device) for m, x in sorted(masks.items())]
        return tuple(sig)

    def _forward(self, features: dict[str, Tensor], masks: dict[str, Tensor] | None) -> Any:
        dev = next(iter(features.values())).device.type
        with torch.inference_mode(), torch.autocast(dev, dtype=torch.bfloat16,
                                                    enabled=self.amp and dev == "cuda"):
            return self.model(features, masks)

    def _capture(self, sig: _Sig, features: dict[str, Tensor],
                 masks: dict[str, Tensor] | None) -> None:
        static_f = {m: x.clone() for m, x in features.items()}
        static_m = None if masks is None else {m: x.clone() for m, x in masks.items()}
        device = next(iter(features.values())).device
        try:
            graph, out = capture_graph(lambda: self._forward(static_f, static_m), device)
        except Exception as e:  # noqa: BLE001 - any capture failure means "run it eagerly"
            warn_once(f"GraphedForward: {capture_failure(e)}; running eagerly")
            self._graphs[sig] = None
            return
        self._graphs[sig] = (graph, static_f, static_m, out)
        while sum(v is not None for v in self._graphs.values()) > self.max_graphs:
            old = next(k for k, v in self._graphs.items() if v is not None)
            del self._graphs[old]

    def __call__(self, features: dict[str, Tensor], masks: dict[str, Tensor] | None = None) -> Any:
        if self.model.training:
            raise RuntimeError("GraphedForward: the model is in training mode; call model.eval()")
        device = next(iter(features.values())).device
        if device.type != "cuda":
            warn_once("GraphedForward: CUDA graphs need a CUDA device; running eagerly")
            entry = None
        else:
            sig = self._signature(features, masks)
            if sig not in self._graphs:
                self._capture(sig, features, masks)
            entry = self._graphs[sig]
            self._graphs.move_to_end(sig)
        if entry is None:
            self.eager_calls += 1
            return self._forward(features, masks)
        graph, static_f, static_m, out = entry
        with torch.no_grad():
            for m, x in features.items():
                static_f[m].copy_(x)
            if masks is not None:
                for m, x in masks.items():
                    static_m[m].copy_(x)
        graph.replay()
        self.replays += 1
        return out
