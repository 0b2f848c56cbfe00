"""Multi-process training on PyTorch's own engine: torch.distributed, DDP, torchrun.

Three ways to use several processes (docs/DISTRIBUTED.md is the user's guide):

* ``torchrun --nproc_per_node N -m alignmamba train ...`` (or ``alignmamba train --nproc N``,
  which runs exactly that through ``python -m torch.distributed.run --standalone``): one
  training run, data-parallel. :func:`setup` reads RANK / WORLD_SIZE / LOCAL_RANK, joins the
  process group (NCCL with ``cuda:LOCAL_RANK`` on GPUs, Gloo on CPU), :func:`wrap_model`
  wraps the model in ``DistributedDataParallel``, :func:`train_sampler` shards the
  shuffled training set (a ``DistributedSampler``), :func:`shard_sampler` splits the
  validation / test sets without padding and :func:`gather_by_index` puts the predictions
  of every process back together, each sample exactly once, in index order.
* ``train.seed_parallel=true`` (``--seeds-parallel``): several seeds at once, one process
  per seed, one seed per GPU (:func:`run_seeds_parallel`); the seed records are aggregated by
  the same code as the sequential path.

Batch rule: ``data.batch_size`` is the *global* batch; each of the W processes takes
``batch_size // W`` samples per step and W must divide it (:func:`per_rank_batch`). DDP
averages the W per-process mean gradients, which is the mean gradient over the global
batch, so one step is the single-process step on the same samples.

Only rank 0 writes files and prints; every decision that changes control flow (a
non-finite loss, the validation loss that drives early stopping) is made identical on every
rank by a collective (:func:`all_ok`, :func:`broadcast`), so the ranks never diverge.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler
from torch.utils.data.distributed import DistributedSampler

from .errors import AlignMambaError, ConfigError, DataError

__all__ = [
    "DistEnv",
    "ShardSampler",
    "all_ok",
    "barrier",
    "broadcast",
    "detect_env",
    "first_batch",
    "gather_by_index",
    "get_env",
    "is_main",
    "launch_torchrun",
    "main_first",
    "nproc_argv",
    "per_rank_batch",
    "rank_seed",
    "run_seeds_parallel",
    "seed_parallel_active",
    "seed_worker_main",
    "set_epoch",
    "setup",
    "shard_sampler",
    "sum_across",
    "teardown",
    "train_sampler",
    "unwrap",
    "wrap_model",
]

# torchrun's variables; RANK and WORLD_SIZE decide whether we run distributed at all.
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# DistributedSampler draws its permutation with seed + epoch; spacing the training seeds by
# 1000 keeps consecutive seeds (MMSA's 1111..1115) from replaying each other's epoch orders.
SEED_STRIDE = 1000


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank in [0, world), its GPU index on the node, device, backend.

    ``backend`` is None when no process group is in use (a plain single-process run).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ENV = DistEnv()
_OWN_GROUP = False  # we created the process group, so teardown destroys it


def detect_env(environ: dict[str, str] | None = None) -> DistEnv | None:
    """The torchrun variables as a :class:`DistEnv` (no device yet), or None outside torchrun."""
    env = os.environ if environ is None else environ
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    vals = {}
    for name in _TORCHRUN_VARS:
        raw = env.get(name, "0" if name == "LOCAL_RANK" else None)
        if raw is None:
            raise ConfigError(f"environment: {name} is not set but {'RANK' if name == 'WORLD_SIZE' else 'WORLD_SIZE'} "
                              "is (launch with torchrun or alignmamba train --nproc N)")
        try:
            vals[name] = int(raw)
        except ValueError:
            raise ConfigError(f"environment: {name}={raw!r} is not an integer") from None
    rank, world, local = vals["RANK"], vals["WORLD_SIZE"], vals["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} are inconsistent")
    return DistEnv(rank=rank, world=world, local_rank=local)


def per_rank_batch(global_batch: int, world: int) -> int:
    """``data.batch_size`` is the global batch; each of ``world`` processes takes an equal share."""
    if world < 1:
        raise ConfigError(f"number of processes: must be >= 1, got {world}")
    if global_batch % world:
        raise ConfigError(f"data.batch_size: {global_batch} is the global batch and must be divisible by the "
                          f"{world} processes (each takes batch_size / {world}); use a multiple of {world}")
    return global_batch // world


def _device_for(env: DistEnv, device_name: str) -> torch.device:
    """CUDA ranks use ``cuda:LOCAL_RANK``; ``train.device=cpu`` (or no CUDA) means Gloo on CPU."""
    if device_name == "cpu" or (device_name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not device_name.startswith("cuda") and device_name != "auto":
        raise ConfigError(f"train.device: '{device_name}' is not supported with torchrun (use auto, cuda or cpu)")
    if not torch.cuda.is_available():
        raise ConfigError(f"train.device: {device_name}: CUDA is not available on this machine")
    if device_name not in ("auto", "cuda") and env.world > 1:
        raise ConfigError(f"train.device: {device_name}: with torchrun every process uses cuda:LOCAL_RANK; "
                          "give auto or cuda (pick the GPUs with CUDA_VISIBLE_DEVICES)")
    n = torch.cuda.device_count()
    if env.local_rank >= n:
        raise ConfigError(f"environment: LOCAL_RANK={env.local_rank} but only {n} CUDA device(s) are visible; "
                          f"start at most {n} processes per node")
    return torch.device("cuda", env.local_rank)


def setup(device_name: str = "auto", global_batch: int | None = None) -> DistEnv:
    """Join the torchrun process group once per process (idempotent); world 1 outside torchrun.

    device_name: ``train.device``. global_batch: ``data.batch_size``, checked against the world
    size before anything starts, so a bad batch size is one error line on every rank.
    """
    global _ENV, _OWN_GROUP
    found = detect_env()
    if found is None:
        if global_batch is not None:
            per_rank_batch(global_batch, 1)
        return _ENV
    if global_batch is not None:
        per_rank_batch(global_batch, found.world)
    if _ENV.active:
        return _ENV
    device = _device_for(found, device_name)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)  # all_gather_object and NCCL use the current device
    if not dist.is_initialized():
        kw: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=found.rank, world_size=found.world, **kw)
        _OWN_GROUP = True
    _ENV = DistEnv(found.rank, found.world, found.local_rank, device, dist.get_backend())
    if not _ENV.is_main:
        # "only rank 0 prints": the other ranks would repeat each warning world - 1 times
        warnings.filterwarnings("ignore")
    return _ENV


def teardown() -> None:
    """Destroy the process group if :func:`setup` created it."""
    global _ENV, _OWN_GROUP
    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP = False
    _ENV = DistEnv()


def get_env() -> DistEnv:
    """This process's :class:`DistEnv` (rank 0 of 1 unless :func:`setup` joined a group)."""
    return _ENV


def is_main() -> bool:
    return _ENV.is_main


def barrier() -> None:
    if _ENV.active and _ENV.world > 1:
        if _ENV.backend == "nccl":
            dist.barrier(device_ids=[_ENV.local_rank])
        else:
            dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. repairs files after a kill), then the others."""
    if not _ENV.is_main:
        barrier()
    yield
    if _ENV.is_main:
        barrier()


def silent(*args: Any, **kwargs: Any) -> None:
    """The logger of ranks other than 0."""


# ------------------------------------------------------------------ samplers

def train_sampler(n: int, seed: int, rank: int = 0, world: int = 1) -> DistributedSampler:
    """A shuffling ``DistributedSampler`` over ``n`` samples for process ``rank`` of ``world``.

    The permutation of epoch e is ``randperm(n)`` under the seed ``SEED_STRIDE * seed + e``
    (call :func:`set_epoch` every epoch). Rank r takes positions r, r + W, r + 2W, ... of it,
    so step k of the W ranks together covers positions [kB, (k+1)B) with B = the global
    batch: the same samples as step k of a single-process run with batch B. When W does not
    divide n the sampler repeats the first n mod W positions (the usual DDP padding); this
    touches training only, evaluation uses :func:`shard_sampler`.
    """
    return DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                              seed=SEED_STRIDE * int(seed), drop_last=False)


class ShardSampler(Sampler[int]):
    """Contiguous, unpadded shard of ``range(n)`` for rank ``rank`` of ``world``: rank r gets
    [r n / W, (r+1) n / W). The shards partition the split, so gathering them gives every
    sample exactly once (sizes may differ by one; some are empty when n < W)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside [0, {world})")
        self.start = (rank * n) // world
        self.stop = ((rank + 1) * n) // world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def shard_sampler(n: int, rank: int = 0, world: int = 1) -> ShardSampler:
    return ShardSampler(n, rank, world)


def set_epoch(loader: Any, epoch: int) -> None:
    """Select epoch ``epoch``'s permutation in the loader's ``DistributedSampler`` (if any)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(int(epoch))


def first_batch(loader: Any) -> Any:
    """The first ``batch_size`` samples of the loader's dataset, collated (for a probe step)."""
    ds = loader.dataset
    n = min(len(ds), int(loader.batch_size or 1))
    return loader.collate_fn([ds[i] for i in range(n)])


def rank_seed(seed: int, rank: int) -> int:
    """Seed of a rank's own random streams (dropout, missing-modality masks): ``seed`` itself on
    rank 0, an independent stream derived from (seed, rank) on the others. All ranks build the
    model from the same seed (identical initial weights); afterwards ranks > 0 reseed, so that
    they do not draw the same dropout masks or dropped modalities for their different samples."""
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed) % 2**63, int(rank)]).generate_state(1, dtype=np.uint32)[0])


# ------------------------------------------------------------------ model

def _unused_parameters(model: nn.Module, probe: Callable[[nn.Module], Any]) -> list[str]:
    """Names of trainable parameters that one forward/backward of ``probe`` leaves without a
    gradient. The RNG is forked so the probe changes no random stream; grads are cleared."""
    saved = [(p, p.grad) for p in model.parameters()]
    for p, _ in saved:
        p.grad = None
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        out = probe(model)
        (out.pred.float().sum() + out.align_loss.float()).backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for p, g in saved:
        p.grad = g
    return names


def wrap_model(model: nn.Module, probe: Callable[[nn.Module], Any] | None = None,
               varying_graph: bool = False) -> nn.Module:
    """``model`` itself in a single process; under a process group, ``DistributedDataParallel``.

    find_unused_parameters costs an extra graph traversal every step, so it is on only when
    needed: when ``varying_graph`` (the set of used parameters changes per batch, e.g. the
    missing-modality tokens under ``data.missing_protocol``) or when one ``probe`` step
    (``probe(model) -> ModelOutput``) leaves a parameter without a gradient (e.g. the missing
    tokens when no modality is ever missing). Rank 0's decision is broadcast, since DDP hangs
    if the ranks disagree. Keep a reference to ``model``: checkpoints save the unwrapped module.
    """
    env = _ENV
    if not env.active:
        return model
    need = bool(varying_graph)
    if not need and probe is not None and env.is_main:
        need = bool(_unused_parameters(model, probe))
    need = bool(broadcast(need))
    from torch.nn.parallel import DistributedDataParallel as DDP

    if env.device is not None and env.device.type == "cuda":
        return DDP(model, device_ids=[env.local_rank], output_device=env.local_rank,
                   find_unused_parameters=need)
    return DDP(model, find_unused_parameters=need)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or ``model`` itself)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model


# ------------------------------------------------------------------ collectives

def _collective_device() -> torch.device:
    return _ENV.device if _ENV.backend == "nccl" and _ENV.device is not None else torch.device("cpu")


def all_ok(flag: bool) -> bool:
    """True on every rank iff ``flag`` is True on every rank (e.g. "my loss is finite")."""
    if not (_ENV.active and _ENV.world > 1):
        return bool(flag)
    t = torch.tensor([0 if flag else 1], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item()) == 0


def sum_across(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64), e.g. epoch loss sums and counts."""
    if not (_ENV.active and _ENV.world > 1):
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu().tolist()]


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    if not (_ENV.active and _ENV.world > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_by_index(pred: torch.Tensor, label: torch.Tensor, index: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's (pred (n_r,) or (n_r, C), label (n_r,), index (n_r,)) -> the whole split on
    every rank, sorted by sample index, each index once (a repeated index, as a padding
    sampler would produce, keeps its first occurrence)."""
    if not (_ENV.active and _ENV.world > 1):
        return pred, label, index
    parts: list[Any] = [None] * _ENV.world
    dist.all_gather_object(parts, (pred.cpu(), label.cpu(), index.cpu()))
    return _merge_parts(parts)


def _merge_parts(parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate (pred, label, index) parts, sort by index (stable), keep each index once."""
    full = [x for x in parts if x[2].numel() > 0]
    if not full:
        return parts[0]
    p = torch.cat([x[0] for x in full])
    y = torch.cat([x[1] for x in full])
    i = torch.cat([x[2] for x in full])
    order = torch.argsort(i, stable=True)
    p, y, i = p[order], y[order], i[order]
    first = torch.ones_like(i, dtype=torch.bool)
    first[1:] = i[1:] != i[:-1]
    return p[first], y[first], i[first]


# ------------------------------------------------------------------ launching: --nproc

def nproc_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (or an abbreviation argparse accepted)."""
    out: list[str] = []
    skip = False
    for i, tok in enumerate(argv):
        if skip:
            skip = False
            continue
        if tok == "--":
            out.extend(argv[i:])
            break
        name = tok.split("=", 1)[0]
        if len(name) >= 3 and "--nproc".startswith(name):
            skip = "=" not in tok
            continue
        out.append(tok)
    return out


def _package_pythonpath(environ: dict[str, str]) -> dict[str, str]:
    """Children must import this very package (also from a source tree that is not installed)."""
    env = dict(environ)
    root = str(Path(__file__).resolve().parent.parent)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        env["PYTHONPATH"] = os.pathsep.join([root, *parts])
    return env


def launch_torchrun(cfg: Any, argv: Sequence[str], nproc: int) -> int:
    """``alignmamba train --nproc N ...``: run ``python -m torch.distributed.run --standalone
    --nproc_per_node N -m alignmamba <argv without --nproc>`` and return its exit code.

    cfg: the resolved ExperimentConfig, checked here so that a user error is one line (exit 2)
    rather than N tracebacks from torchrun (which exits 1 when a worker fails).
    """
    if nproc < 1:
        raise ConfigError(f"--nproc: must be >= 1, got {nproc}")
    if detect_env() is not None:
        raise ConfigError("--nproc: already running under torchrun (RANK/WORLD_SIZE are set); drop --nproc")
    per_rank_batch(cfg.data.batch_size, nproc)
    if getattr(cfg.train, "seed_parallel", False):
        raise ConfigError("--nproc: cannot be combined with --seeds-parallel / train.seed_parallel "
                          "(one runs every seed data-parallel, the other one seed per process)")
    path = getattr(cfg.data, "path", None)
    if path and not Path(path).is_file():  # the commonest mistake, before N processes start
        raise DataError(f"--data {path}: no such file")
    dev = cfg.train.device
    if dev != "cpu" and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if nproc > n:
            raise ConfigError(f"--nproc {nproc}: only {n} CUDA device(s) are visible (one process per GPU); "
                              "use --device cpu for CPU processes")
    elif dev.startswith("cuda"):
        raise ConfigError(f"--device {dev}: CUDA is not available on this machine")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "alignmamba", *nproc_argv(argv)]
    proc = subprocess.Popen(cmd, env=_package_pythonpath(dict(os.environ)))
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)  # torchrun forwards it to its workers and cleans up
        proc.wait()
        return 130
    return 128 - rc if rc < 0 else rc


# ------------------------------------------------------------------ several seeds in parallel

def seed_parallel_active(cfg: Any) -> bool:
    """``train.seed_parallel`` with more than one seed (one seed needs no extra process)."""
    return bool(getattr(cfg.train, "seed_parallel", False)) and len(cfg.train.seeds) > 1


def visible_gpus() -> list[str]:
    """The GPUs a child process may be pinned to: CUDA_VISIBLE_DEVICES entries (or indices)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else \
        [str(i) for i in range(torch.cuda.device_count())]
    return ids[: torch.cuda.device_count()] or ["0"]


def _slots(cfg: Any) -> tuple[list[str | None], str]:
    """The parallel slots: one per visible GPU (its CUDA_VISIBLE_DEVICES entry), else CPU slots."""
    dev = cfg.train.device
    if dev not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"train.device: {dev}: with train.seed_parallel each seed gets a whole GPU; "
                          "give auto, cuda or cpu (pick the GPUs with CUDA_VISIBLE_DEVICES)")
    if dev != "cpu" and torch.cuda.is_available():
        return visible_gpus(), "cuda"
    if dev == "cuda":
        raise ConfigError("train.device: cuda: CUDA is not available on this machine")
    jobs = max(1, min(len(cfg.train.seeds), os.cpu_count() or 1))
    return [None] * jobs, "cpu"


def _read_record(path: Path, seed: int) -> dict[str, Any]:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AlignMambaError(f"{path}: seed {seed}'s worker left no readable record ({type(e).__name__})") from None
    if not isinstance(rec, dict) or rec.get("seed") != seed or not isinstance(rec.get("test"), dict):
        raise AlignMambaError(f"{path}: not the record of seed {seed}")
    return rec


WORKER_RESULT = "result.json"  # the seed's record in seed_<s>/ (the name train_state.py uses too)


@dataclass
class SeedTask:
    """One worker's job: seed ``seed`` of the run whose resolved config is ``out/config.json``."""

    out: Path
    seed: int
    label: str = ""  # for start / finish messages (empty: none)
    log_file: Path | None = None  # the worker's output; None: passed to ``log`` line by line


def run_seed_workers(tasks: Sequence[SeedTask], slot_envs: Sequence[dict[str, str]], resume: bool,
                     log: Callable[..., None] = print) -> list[tuple[SeedTask, int]]:
    """Run :func:`seed_worker_main` for every task, at most one per slot at a time; a worker gets
    its slot's environment variables (e.g. CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS) on top of ours.
    Returns the failed tasks with their exit codes, after every worker has ended; on an
    exception (Ctrl-C) the workers started here are terminated first."""
    code = "from alignmamba.distributed import seed_worker_main as m; raise SystemExit(m())"
    pending = list(tasks)
    running: dict[int, tuple[subprocess.Popen, SeedTask, threading.Thread | None, Any]] = {}
    failed: list[tuple[SeedTask, int]] = []
    log_lock = threading.Lock()

    def pump(proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with log_lock:
                log(line.rstrip("\n"))

    def start(slot: int, task: SeedTask) -> None:
        env = _package_pythonpath(dict(os.environ))
        env.update(slot_envs[slot])
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, "-c", code, str(task.out), str(task.seed), *(["--resume"] if resume else [])]
        if task.log_file is not None:
            fh = open(task.log_file, "w", encoding="utf-8")  # noqa: SIM115 - closed when the worker ends
            proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
            reader = None
        else:
            fh = None
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            reader = threading.Thread(target=pump, args=(proc,), daemon=True)
            reader.start()
        running[slot] = (proc, task, reader, fh)
        if task.label:
            log(f"   started {task.label}")

    def finish(slot: int) -> None:
        proc, task, reader, fh = running.pop(slot)
        if reader is not None:
            reader.join()
        if fh is not None:
            fh.close()
        if proc.returncode != 0:
            failed.append((task, proc.returncode))
        if task.label:
            where = f"; see {task.log_file}" if task.log_file is not None else ""
            log(f"   finished {task.label}" if proc.returncode == 0 else
                f"   FAILED {task.label} (exit code {proc.returncode}{where})")

    try:
        for slot in range(len(slot_envs)):
            if pending:
                start(slot, pending.pop(0))
        while running:
            done = next((slot for slot, (proc, *_) in running.items() if proc.poll() is not None), None)
            if done is None:
                threading.Event().wait(0.2)
                continue
            finish(done)
            if pending:
                start(done, pending.pop(0))
    except BaseException:
        for proc, *_ in running.values():  # only the workers started here
            proc.terminate()
        for proc, _, _, fh in running.values():
            proc.wait()
            if fh is not None:
                fh.close()
        raise
    return failed


def run_seeds_parallel(cfg: Any, out: Path, log: Callable[..., None] = print,
                       resume: bool = False) -> list[dict[str, Any]]:
    """Train ``cfg.train.seeds`` in worker processes, at most one per GPU at a time (round-robin
    over the visible GPUs; on CPU up to one per core), and return their records in seed order.

    ``out/config.json`` must already hold ``cfg`` (the workers read it). Each worker runs
    :func:`alignmamba.train.train_one_seed` for one seed (its files go to ``out/seed_<s>/`` as in
    the sequential run) and writes the record to ``seed_<s>/result.json``; the caller aggregates
    them exactly as the sequential path does. Worker output is passed to ``log`` line by line.
    With ``resume``, seeds that already have a record are not run again.
    """
    if _ENV.active and _ENV.world > 1:
        raise ConfigError("train.seed_parallel: cannot run under torchrun (it starts its own processes)")
    slots, kind = _slots(cfg)
    seeds = [int(s) for s in cfg.train.seeds]
    records: dict[int, dict[str, Any]] = {}
    todo: list[int] = []
    for s in seeds:
        rec_path = out / f"seed_{s}" / WORKER_RESULT
        if resume and rec_path.is_file():
            records[s] = _read_record(rec_path, s)
            log(f"seed {s}: already finished ({rec_path})")
        else:
            todo.append(s)
    threads = None
    if kind == "cpu" and int(getattr(cfg.train, "threads", 0)) <= 0:
        threads = max(1, (os.cpu_count() or 1) // len(slots))
    log(f"seed-parallel: {len(todo)} seed(s) over {len(slots)} {'GPU' if kind == 'cuda' else 'CPU'} slot(s)"
        + (f" ({', '.join('GPU ' + str(g) for g in slots)})" if kind == "cuda" else ""))
    slot_envs = [{"CUDA_VISIBLE_DEVICES": str(g)} if kind == "cuda" else
                 ({"OMP_NUM_THREADS": str(threads)} if threads is not None else {}) for g in slots]
    failed = run_seed_workers([SeedTask(out, s) for s in todo], slot_envs, resume, log)
    if failed:
        desc = ", ".join(f"seed {t.seed} (exit code {rc})" for t, rc in failed)
        raise AlignMambaError(f"train.seed_parallel: {desc} failed; see the seed's output above")
    for s in todo:
        records[s] = _read_record(out / f"seed_{s}" / WORKER_RESULT, s)
    return [records[s] for s in seeds]


def seed_worker_main(argv: Sequence[str] | None = None) -> int:
    """Worker of :func:`run_seeds_parallel`: ``OUT SEED [--resume]``; trains one seed of the run
    whose resolved config is ``OUT/config.json``. User errors: one line, exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    resume = "--resume" in args
    args = [a for a in args if a != "--resume"]
    if len(args) != 2:
        print("usage: seed_worker_main OUT SEED [--resume]", file=sys.stderr)
        return 2
    out, seed = Path(args[0]), int(args[1])
    try:
        from .checkpoint import atomic_write_json
        from .config import from_dict, load_file
        from .train import ExperimentConfig, load_experiment_data, train_one_seed

        cfg = from_dict(ExperimentConfig, load_file(out / "config.json"), str(out / "config.json"))
        cfg.train.out = str(out)
        cfg.train.quiet = True  # several progress bars on one terminal would clobber each other
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        ds = load_experiment_data(cfg)
        kw = {"resume": True} if resume else {}
        record = train_one_seed(cfg, ds, seed, out / f"seed_{seed}", log=print, **kw)
        atomic_write_json(out / f"seed_{seed}" / WORKER_RESULT, record)
    except AlignMambaError as e:
        print(f"alignmamba: error: seed {seed}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
