"""Multi-process training (alignmamba/distributed.py): samplers, argv handling, and end-to-end
runs of 2 CPU processes with Gloo through ``alignmamba train --nproc 2`` and ``--seeds-parallel``.

The end-to-end runs use SGD without clipping on purpose: Adam (and clipping) are nearly
invariant to the scale of the gradient, so a DDP run that summed instead of averaging the
per-process gradients would still match a single-process Adam run. With SGD, lr 0.05, such a
bug moves the test predictions by ~0.1 (measured by doubling the lr), while a correct run
differs from the single-process one by ~5e-8 (float32 summation order in the all-reduce and
in per-process vs whole-batch means). The tolerance 1e-5 sits between the two.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignmamba import distributed as D
from alignmamba.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
N_TRAIN, N_VALID, N_TEST = 64, 30, 31  # odd test split: a padding sampler would repeat a sample
TINY = ["--epochs", "1", "--quiet",
        "--set", f"data.synthetic_n_train={N_TRAIN}", "--set", f"data.synthetic_n_valid={N_VALID}",
        "--set", f"data.synthetic_n_test={N_TEST}", "--set", "model.d_model=16", "--set", "model.n_layers=1",
        "--set", "model.dropout=0", "--set", "train.threads=1", "--set", "data.batch_size=16",
        "--set", "optim.name=sgd", "--set", "optim.lr=0.05", "--set", "optim.grad_clip=0",
        # the reference trains in this process: on a machine with a GPU it must not pick CUDA while
        # the DDP runs use the CPU (their env hides the GPUs), or the two differ by more than TOL
        "--set", "train.device=cpu"]
TOL = 1e-5  # see the module docstring

# Started in every Python process of a run (PYTHONPATH): records which rank writes which file.
_JOURNAL_HOOK = '''
import os
_journal = os.environ.get("ALIGNMAMBA_TEST_WRITE_JOURNAL")
if _journal:
    import alignmamba.checkpoint as _ck

    def _record(fn, pos):
        def inner(*a, **k):
            with open(_journal, "a") as f:
                f.write(os.environ.get("RANK", "-") + "\\t" + str(a[pos]) + "\\n")
            return fn(*a, **k)
        return inner

    _ck.atomic_write_bytes = _record(_ck.atomic_write_bytes, 0)
    _ck.replace_dir = _record(_ck.replace_dir, 0)
    _ck.swap_dir = _record(_ck.swap_dir, 1)
'''


# ------------------------------------------------------------------ pure parts (no processes)

def test_per_rank_batch_rule():
    assert D.per_rank_batch(32, 1) == 32
    assert D.per_rank_batch(32, 4) == 8
    with pytest.raises(ConfigError, match=r"data.batch_size: 30 .* divisible by the 4 processes"):
        D.per_rank_batch(30, 4)
    with pytest.raises(ConfigError):
        D.per_rank_batch(8, 0)


def _epoch_batches(n: int, seed: int, epoch: int, world: int, batch: int) -> list[list[set[int]]]:
    """Per step, per rank: the set of sample indices that rank trains on."""
    per = D.per_rank_batch(batch, world)
    ranks = []
    for r in range(world):
        s = D.train_sampler(n, seed, r, world)
        s.set_epoch(epoch)
        idx = list(s)
        ranks.append([set(idx[i:i + per]) for i in range(0, len(idx), per)])
    assert len({len(x) for x in ranks}) == 1  # every rank takes the same number of steps
    return [[ranks[r][k] for r in range(world)] for k in range(len(ranks[0]))]


@pytest.mark.parametrize("world,batch", [(2, 16), (4, 16), (3, 12)])
def test_train_sampler_steps_are_the_single_process_batches(world, batch):
    n = 96  # divisible by every world here: no padding, so the union must match exactly
    single = [step[0] for step in _epoch_batches(n, 1111, 3, 1, batch)]
    multi = _epoch_batches(n, 1111, 3, world, batch)
    assert len(multi) == len(single)
    for k, parts in enumerate(multi):
        assert sum(len(p) for p in parts) == batch
        assert set().union(*parts) == single[k]
        assert all(not (a & b) for i, a in enumerate(parts) for b in parts[i + 1:])


def test_train_sampler_epochs_and_seeds_differ_and_repeat():
    def order(seed: int, epoch: int) -> list[int]:
        s = D.train_sampler(50, seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(1111, 1) == order(1111, 1)
    assert order(1111, 1) != order(1111, 2)
    assert sorted(order(1111, 1)) == list(range(50))
    # DistributedSampler seeds with seed + epoch; the stride keeps seed 1112 from replaying 1111's epoch 2
    assert order(1112, 1) != order(1111, 2)


def test_train_sampler_pads_uneven_training_sets():
    s0, s1 = D.train_sampler(7, 5, 0, 2), D.train_sampler(7, 5, 1, 2)
    a, b = list(s0), list(s1)
    assert len(a) == len(b) == 4 and set(a) | set(b) == set(range(7))


@pytest.mark.parametrize("n,world", [(31, 2), (30, 2), (10, 3), (2, 4), (0, 2), (5, 1)])
def test_shard_sampler_partitions_without_padding(n, world):
    shards = [list(D.ShardSampler(n, r, world)) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [len(D.ShardSampler(n, r, world)) for r in range(world)] == [len(s) for s in shards]


def test_merge_parts_dedupes_and_sorts():
    p = lambda *v: torch.tensor(v, dtype=torch.float32)
    i = lambda *v: torch.tensor(v, dtype=torch.int64)
    # rank 1 repeats index 0 as a padding sampler would; an empty shard is fine
    parts = [(p(0.3, 0.1), p(3.0, 1.0), i(3, 1)), (p(0.2, 0.0, 0.3), p(2.0, 0.0, 3.0), i(2, 0, 3)),
             (torch.zeros(0), torch.zeros(0), i())]
    pred, label, idx = D._merge_parts(parts)
    assert idx.tolist() == [0, 1, 2, 3]
    assert pred.tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert label.tolist() == [0.0, 1.0, 2.0, 3.0]
    logits = [(torch.randn(2, 3), i(0, 0), i(1, 0)), (torch.randn(1, 3), i(1), i(2))]
    pred, _, idx = D._merge_parts(logits)
    assert pred.shape == (3, 3) and idx.tolist() == [0, 1, 2]
    assert torch.equal(pred[0], logits[0][0][1]) and torch.equal(pred[1], logits[0][0][0])


def test_nproc_argv_strips_only_nproc():
    base = ["train", "--out", "x", "--set", "a=1"]
    for extra in (["--nproc", "2"], ["--nproc=2"], ["--npr", "2"]):
        assert D.nproc_argv(base[:1] + extra + base[1:]) == base
    assert D.nproc_argv(base) == base


def test_detect_env():
    assert D.detect_env({}) is None
    e = D.detect_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (e.rank, e.world, e.local_rank, e.is_main, e.active) == (1, 2, 1, False, False)
    with pytest.raises(ConfigError, match="WORLD_SIZE is not set"):
        D.detect_env({"RANK": "0"})
    with pytest.raises(ConfigError, match="inconsistent"):
        D.detect_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="not an integer"):
        D.detect_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_rank_seed():
    assert D.rank_seed(1111, 0) == 1111
    assert D.rank_seed(1111, 1) != D.rank_seed(1111, 2) != 1111
    assert D.rank_seed(1111, 1) == D.rank_seed(1111, 1)


def test_launcher_refuses_before_starting_anything(tmp_path, capsys):
    from alignmamba.cli import main

    out = tmp_path / "never"
    rc = main(["train", "--nproc", "3", "--out", str(out), *TINY])  # batch 16 over 3 processes
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "data.batch_size: 16" in err and "3 processes" in err
    rc = main(["train", "--nproc", "2", "--seeds-parallel", "--out", str(out), *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "--seeds-parallel" in err
    assert not out.exists()


# ------------------------------------------------------------------ end to end (processes)

def _env(tmp: Path, journal: Path | None = None) -> dict[str, str]:
    hook = tmp / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(_JOURNAL_HOOK)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(hook), str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("ALIGNMAMBA_TEST_WRITE_JOURNAL", None)
    if journal is not None:
        env["ALIGNMAMBA_TEST_WRITE_JOURNAL"] = str(journal)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU / Gloo path also on a machine with GPUs
    return env


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alignmamba", *args], check=False, env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def _predictions(run: Path, seed: int = 1111) -> dict[int, float]:
    with open(run / f"seed_{seed}" / "test_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    idx = [int(r["index"]) for r in rows]
    assert sorted(idx) == list(range(N_TEST)) and len(idx) == N_TEST, "every test sample exactly once"
    return {int(r["index"]): float(r["prediction"]) for r in rows}


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _log_rows(run: Path, seed: int = 1111) -> list[dict[str, str]]:
    with open(run / f"seed_{seed}" / "log.csv") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The single-process reference (seeds 1111 and 1112), trained in this process."""
    from alignmamba.cli import main

    out = tmp_path_factory.mktemp("single") / "run"
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--out", str(out), "--seeds", "1111", "1112", *TINY]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> list[tuple[Path, subprocess.CompletedProcess, Path]]:
    """The same training twice with 2 processes (Gloo), through ``alignmamba train --nproc 2``;
    the second with ``--deterministic`` (on the CPU it changes no result, so the two must agree)."""
    runs = []
    for k in range(2):
        tmp = tmp_path_factory.mktemp(f"ddp{k}")
        journal = tmp / "writes.tsv"
        out = tmp / "run"
        flag = ["--deterministic"] if k else []
        proc = _cli(["train", "--nproc", "2", "--out", str(out), "--seeds", "1111", *flag, *TINY],
                    _env(tmp, journal))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs.append((out, proc, journal))
    return runs


def test_two_processes_write_once_from_rank_0(ddp_runs):
    out, proc, journal = ddp_runs[0]
    writes = [line.split("\t", 1) for line in journal.read_text().splitlines()]
    assert writes, "the journal hook recorded nothing"
    assert {rank for rank, _ in writes} == {"0"}, f"ranks other than 0 wrote files: {writes}"
    paths = [Path(p) for _, p in writes]
    assert paths.count(out / "metrics.json") == 1
    assert paths.count(out / "config.json") == 1
    assert paths.count(out / "seed_1111" / "test_predictions.csv") == 1
    assert (out / "seed_1111" / "best" / "model.safetensors").is_file()
    # only rank 0 prints: one epoch line, one results table
    assert proc.stdout.count("seed 1111 epoch   1") == 1
    assert proc.stdout.count("results in") == 1
    _predictions(out)  # covers every test index exactly once
    m = _metrics(out)
    assert [s["seed"] for s in m["seeds"]] == [1111]


def test_two_processes_match_one_process(ddp_runs, single):
    out = ddp_runs[0][0]
    ref, got = _predictions(single), _predictions(out)
    diff = max(abs(ref[i] - got[i]) for i in ref)
    assert diff <= TOL, f"2-process predictions differ from 1-process by {diff}"
    r, g = _metrics(single)["seeds"][0], _metrics(out)["seeds"][0]
    assert g["best_epoch"] == r["best_epoch"] == 1
    for key in ("valid_loss", "test_loss"):
        assert g[key] == pytest.approx(r[key], rel=TOL, abs=TOL)
    assert g["test"]["MAE"] == pytest.approx(r["test"]["MAE"], abs=TOL)
    assert g["test"]["Corr"] == pytest.approx(r["test"]["Corr"], abs=1e-4)
    # the epoch's training loss is the mean over the same 64 samples
    lr, lg = _log_rows(single)[0], _log_rows(out)[0]
    assert float(lg["train_loss"]) == pytest.approx(float(lr["train_loss"]), rel=TOL)
    assert float(lg["valid_loss"]) == pytest.approx(float(lr["valid_loss"]), rel=TOL)


def test_two_process_run_is_reproducible(ddp_runs):
    (a, _, _), (b, _, _) = ddp_runs
    cfg_a, cfg_b = (json.loads((r / "config.json").read_text()) for r in (a, b))
    assert (cfg_a["train"]["deterministic"], cfg_b["train"]["deterministic"]) == (False, True)
    assert _predictions(a) == _predictions(b)
    ma, mb = _metrics(a), _metrics(b)
    for k in ("test", "valid"):
        assert ma[k] == mb[k]
    assert _log_rows(a) == _log_rows(b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL across processes needs 2 CUDA devices")
def test_two_gpus_deterministic_runs_repeat_bitwise(tmp_path):
    """``--nproc 2 --deterministic`` on 2 GPUs (NCCL all-reduce, the CUDA kernels, bf16
    autocast): two runs give bitwise-equal predictions, metrics and per-epoch logs. On 2 H100s
    (tenth session) the same test without ``--deterministic`` failed: predictions differed."""
    assert TINY[-2:] == ["--set", "train.device=cpu"]
    # d_model 64: 128 scan channels, so several channel blocks add into dB/dC (atomics without
    # the flag); at d_model 16 (one block) runs without the flag repeated bitwise as well
    args = [*TINY[:-2], "--set", "train.device=cuda", "--epochs", "2", "--set", "model.d_model=64"]
    runs = []
    for k in range(2):
        (tmp_path / f"gpu{k}").mkdir()
        env = _env(tmp_path / f"gpu{k}")
        env.pop("CUDA_VISIBLE_DEVICES")
        env.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast on shared hosts
        out = tmp_path / f"gpu{k}" / "run"
        proc = _cli(["train", "--nproc", "2", "--deterministic", "--out", str(out), "--seeds", "1111",
                     *args], env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert json.loads((out / "config.json").read_text())["train"]["device"] == "cuda"
        runs.append(out)
    a, b = runs
    assert _predictions(a) == _predictions(b)
    assert _metrics(a)["test"] == _metrics(b)["test"]
    assert _log_rows(a) == _log_rows(b) and len(_log_rows(a)) == 2


def test_seeds_parallel_matches_sequential(tmp_path, single):
    from alignmamba.train import resolve_config, run_experiment, summarize

    out = tmp_path / "run"
    overrides = [a for a in TINY[3:] if a != "--set"]
    cfg = resolve_config(None, None, overrides + ["train.seed_parallel=true", f"train.out={out}",
                                                  "train.seeds=[1111, 1112]", "train.epochs=1",
                                                  "train.quiet=true", "train.device=cpu"])
    lines: list[str] = []
    threads = torch.get_num_threads()
    try:
        metrics = run_experiment(cfg, log=lambda *a: lines.append(" ".join(map(str, a))))
    finally:
        torch.set_num_threads(threads)
    text = "\n".join(lines)
    assert "2 seed(s) over 2 CPU slot(s)" in text
    assert text.count("seed 1111 epoch   1") == 1 and text.count("seed 1112 epoch   1") == 1
    assert metrics == _metrics(out)
    ref = _metrics(single)
    assert [s["seed"] for s in metrics["seeds"]] == [1111, 1112]
    for got, want in zip(metrics["seeds"], ref["seeds"]):
        for k, v in want["test"].items():
            assert got["test"][k] == pytest.approx(v, rel=1e-6, abs=1e-6), (got["seed"], k)
        assert _predictions(out, got["seed"]) == pytest.approx(_predictions(single, got["seed"]), abs=1e-6)
    mean, std = summarize(metrics["seeds"])
    assert metrics["test"] == mean and metrics["test_std"] == std
    assert set(metrics) == set(ref)
