"""``alignmamba ablate``: the paper's ablations and baselines with one data set and one trainer.

Every variant is the same experiment config (preset <- config file <- flags <- ``--set``)
with a few ``key=value`` overrides on top, trained by :func:`alignmamba.train.run_experiment`
on the same data and seeds into ``out/<variant>/``. The table (``out/ablation.md`` and
``out/ablation.json``) gives mean and standard deviation over seeds of every test metric
(MMSA definitions, SPEC section 3) and the change of Non0_acc_2 against AlignMamba.

Variants (SPEC section 4 and issue 5):

* ``alignmamba``: the full model (eq. 3-12);
* ``no_ot``: without local OT alignment (sources resampled onto the anchor's time grid);
* ``no_mmd``: without the global MMD loss;
* ``no_ot_no_mmd``: without both;
* ``sinkhorn``: the entropic, differentiable Sinkhorn plan instead of the relaxed argmin (eq. 5);
* ``order_aware``: cost of eq. 3 plus 1.0 x the distance of normalised time positions;
* ``transformer_single``, ``transformer_multi``, ``mamba_single``, ``mamba_multi``: the baselines.
"""
from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_SEEDS = [1111, 1112, 1113]
REFERENCE = "alignmamba"
# variant -> overrides applied on top of the shared experiment config
VARIANTS: dict[str, list[str]] = {
    "alignmamba": [],
    "no_ot": ["model.use_ot=false"],
    "no_mmd": ["model.use_mmd=false"],
    "no_ot_no_mmd": ["model.use_ot=false", "model.use_mmd=false"],
    "sinkhorn": ["model.ot_plan=sinkhorn"],
    "order_aware": ["model.ot_time_beta=1.0"],
    "transformer_single": ["model.model=transformer_single"],
    "transformer_multi": ["model.model=transformer_multi"],
    "mamba_single": ["model.model=mamba_single"],
    "mamba_multi": ["model.model=mamba_multi"],
}
DESCRIPTIONS: dict[str, str] = {
    "alignmamba": "AlignMamba (OT + MMD)",
    "no_ot": "w/o OT (time resampling)",
    "no_mmd": "w/o MMD",
    "no_ot_no_mmd": "w/o OT and MMD",
    "sinkhorn": "Sinkhorn plan",
    "order_aware": "order-aware cost (beta 1)",
    "transformer_single": "single-stream Transformer",
    "transformer_multi": "multi-stream Transformer (MulT)",
    "mamba_single": "single-stream Mamba",
    "mamba_multi": "multi-stream Mamba",
}


def _delta_key(metrics: dict[str, float]) -> str | None:
    """The headline accuracy: Non0_acc_2 for regression, Acc for classification."""
    for key in ("Non0_acc_2", "Acc"):
        if key in metrics:
            return key
    return None


def _scale(key: str) -> float:
    # percentages for accuracies and F1, raw values for MAE / Corr (as train.format_table)
    return 100.0 if ("acc" in key.lower() or "f1" in key.lower()) else 1.0


def variant_config(base, name: str, out: Path):
    """The ExperimentConfig of variant ``name``: ``base`` + VARIANTS[name], output in out/name."""
    from .config import apply_overrides

    cfg = apply_overrides(copy.deepcopy(base), VARIANTS[name])
    cfg.train.out = str(out / name)
    cfg.validate()
    return cfg


def _config_matches(cfg, directory: Path, ignore: tuple[str, ...] = ()) -> bool:
    """Whether ``directory/config.json`` was written for ``cfg`` (train keys in ``ignore`` aside)."""
    from .config import to_dict

    cpath = directory / "config.json"
    try:
        old = json.loads(cpath.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    new = to_dict(cfg)
    # A key the old file lacks (written before that option existed) counts as its default.
    defaults = to_dict(type(cfg)())
    skip = {"train": set(ignore), "model": {"input_dims", "modalities", "interleave_order"}}
    for section, values in new.items():
        if not isinstance(values, dict):
            if old.get(section) != values:
                return False
            continue
        before, dflt = old.get(section, {}), defaults.get(section, {})
        # run_experiment stores the model section after fitting it to the data (input widths,
        # modality order): those keys are not choices of the run
        for k, v in values.items():
            if k not in skip.get(section, ()) and before.get(k, dflt.get(k)) != v:
                return False
    return True


def _reusable(cfg, directory: Path) -> dict[str, Any] | None:
    """metrics.json of a finished earlier run of exactly this config (``--resume``), else None."""
    if not _config_matches(cfg, directory):
        return None
    try:
        metrics = json.loads((directory / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return metrics if isinstance(metrics, dict) and "test" in metrics else None


# Seeds may be trained by workers that differ only in which seeds and whether they were
# quiet; a finished seed of such a run is still a seed of this configuration.
_SEED_KEYS = ("seeds", "quiet", "threads")


def _prepare_seeds(cfg, resume: bool) -> list[int]:
    """Make ``cfg.train.out`` ready for per-seed workers; return the seeds still to train.

    Without ``resume`` (or when the directory holds another configuration) every seed starts
    afresh; with it, seeds whose ``result.json`` exists are kept.
    """
    from .checkpoint import atomic_write_json
    from .config import to_dict
    from .train_state import clear_seed_dir, read_result

    directory = Path(cfg.train.out)
    keep = resume and _config_matches(cfg, directory, _SEED_KEYS)
    directory.mkdir(parents=True, exist_ok=True)
    todo = []
    for seed in cfg.train.seeds:
        seed_dir = directory / f"seed_{seed}"
        if keep and read_result(seed_dir, seed) is not None:
            continue
        if not keep:
            clear_seed_dir(seed_dir)
        todo.append(seed)
    atomic_write_json(directory / "config.json", to_dict(cfg))  # what the workers read
    return todo


def run_jobs(tasks: list[tuple[str, Path, int]], jobs: int, device: str, resume: bool,
             log: Callable[[str], None] = print) -> None:
    """Train ``(variant, out_dir, seed)`` tasks in up to ``jobs`` worker processes at a time.

    Each worker is :func:`alignmamba.distributed.seed_worker_main` (one seed of the run whose
    config is ``out_dir/config.json``); its output goes to ``out_dir/seed_<s>.log``. The
    ``jobs`` slots are spread round-robin over the visible GPUs (several per GPU: small models
    leave most of a GPU idle, so parallel runs raise throughput); on the CPU each gets
    cores / jobs threads. Raises AlignMambaError naming the failed runs after all workers ended.
    """
    import os

    import torch

    from .distributed import SeedTask, run_seed_workers, visible_gpus
    from .errors import AlignMambaError

    gpus = visible_gpus() if device != "cpu" and torch.cuda.is_available() else []
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    slot_envs = [{"OMP_NUM_THREADS": str(threads),
                  **({"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if gpus else {})} for i in range(jobs)]
    log(f"ablate: {len(tasks)} run(s), up to {jobs} at a time"
        + (f" on GPU(s) {', '.join(gpus)}" if gpus else f" on the CPU ({threads} thread(s) each)"))
    failed = run_seed_workers([SeedTask(d, seed, f"{name} seed {seed}", d / f"seed_{seed}.log")
                               for name, d, seed in tasks], slot_envs, resume, log)
    if failed:
        desc = ", ".join(f"{t.label} ({t.log_file})" for t, _ in failed)
        raise AlignMambaError(f"ablate --jobs: {len(failed)} run(s) failed: {desc}")


def run_ablation(base, variants: list[str], out: str | Path, resume: bool = False,
                 log: Callable[[str], None] = print, jobs: int = 1) -> dict[str, Any]:
    """Train every variant of ``variants`` on ``base`` (an ExperimentConfig); write and return the table.

    ``jobs`` > 1 trains the (variant, seed) runs in that many worker processes at once
    (:func:`run_jobs`), then gathers them; the table is the same as with ``jobs=1``.

    Returns the dict written to out/ablation.json:
    ``{"seeds", "data", "delta_key", "variants": [{"name", "description", "overrides", "model",
    "out", "test": means, "test_std": stds, "delta": ...}, ...]}``.
    """
    from .checkpoint import atomic_write_json, atomic_write_text
    from .errors import ConfigError
    from .train import run_experiment

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variants: unknown variant '{unknown[0]}' (known: {', '.join(VARIANTS)})")
    if not variants:
        raise ConfigError("--variants: name at least one variant")
    out = Path(out)
    # every variant's config first: a bad combination fails now, not after hours of training
    configs = {name: variant_config(base, name, out) for name in variants}
    out.mkdir(parents=True, exist_ok=True)
    if jobs > 1:
        from .train import load_experiment_data
        load_experiment_data(base)  # a bad data file fails here in one line, not in every worker
        tasks = []
        for name in variants:
            if resume and _reusable(configs[name], Path(configs[name].train.out)) is not None:
                continue
            tasks += [(name, Path(configs[name].train.out), s) for s in _prepare_seeds(configs[name], resume)]
        run_jobs(tasks, jobs, base.train.device, resume, log)
    rows: list[dict[str, Any]] = []
    data_source = None
    for i, name in enumerate(variants, 1):
        cfg = configs[name]
        log(f"== [{i}/{len(variants)}] {name}: {DESCRIPTIONS[name]}  ({' '.join(VARIANTS[name]) or 'no overrides'})")
        metrics = _reusable(cfg, Path(cfg.train.out)) if resume else None
        if metrics is not None:
            log(f"   reusing {cfg.train.out}/metrics.json (same config)")
        else:
            # finished seeds are reused only when the directory holds this very configuration
            # (the workers of --jobs, or an interrupted earlier --resume run)
            seeds_ok = (resume or jobs > 1) and _config_matches(cfg, Path(cfg.train.out), _SEED_KEYS)
            metrics = run_experiment(cfg, resume=seeds_ok, log=lambda text, _n=name: log(
                "\n".join(f"   [{_n}] {line}" for line in str(text).splitlines())))
        data_source = data_source or metrics.get("data")
        rows.append({"name": name, "description": DESCRIPTIONS[name], "overrides": VARIANTS[name],
                     "model": cfg.model.model, "out": cfg.train.out,
                     "test": metrics["test"], "test_std": metrics["test_std"]})
    key = _delta_key(rows[0]["test"])
    ref = next((r for r in rows if r["name"] == REFERENCE), None)
    for r in rows:
        ok = key is not None and ref is not None and key in r["test"]
        r["delta"] = (r["test"][key] - ref["test"][key]) * _scale(key) if ok else None
    report = {"seeds": list(base.train.seeds), "data": data_source, "epochs": base.train.epochs,
              "delta_key": key, "reference": REFERENCE if ref is not None else None, "variants": rows}
    atomic_write_json(out / "ablation.json", report)
    atomic_write_text(out / "ablation.md", format_ablation(report) + "\n")
    log("")
    log(format_ablation(report))
    log(f"wrote {out / 'ablation.md'} and {out / 'ablation.json'}")
    return report


def format_ablation(report: dict[str, Any]) -> str:
    """Markdown table: variant, mean +- std of each metric over seeds, delta of the headline accuracy."""
    rows = report["variants"]
    metrics = list(rows[0]["test"]) if rows else []
    key = report.get("delta_key")
    head = ["variant"] + metrics + [f"Δ {key} vs AlignMamba" if key else "Δ"]
    title = (f"Test metrics, mean ± std over seeds {report['seeds']} ({report.get('data')}, "
             f"up to {report.get('epochs')} epochs); accuracies and F1 in %.")
    lines = [title, "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [f"{r['name']} ({r['description']})"]
        for k in metrics:
            s = _scale(k)
            cells.append(f"{r['test'][k] * s:.2f} ± {r['test_std'][k] * s:.2f}" if k in r["test"] else "-")
        cells.append("-" if r["delta"] is None else ("0 (ref)" if r["name"] == REFERENCE else f"{r['delta']:+.2f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------ CLI

def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``alignmamba ablate``."""
    p = sub.add_parser("ablate", help="train AlignMamba, its ablations and the baselines; one table")
    p.add_argument("--config", help="YAML or JSON config file shared by every variant")
    p.add_argument("--dataset", choices=["mosi", "mosei", "synthetic"], help="preset (default synthetic)")
    p.add_argument("--data", help="MMSA or MulT feature pickle (default: the synthetic data)")
    p.add_argument("--seeds", type=int, nargs="+", help=f"training seeds (default {' '.join(map(str, DEFAULT_SEEDS))})")
    p.add_argument("--out", default="runs/ablation", help="output directory (one sub-directory per variant)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--variants", nargs="+", help=f"subset to run (default all: {' '.join(VARIANTS)})")
    p.add_argument("--resume", action="store_true",
                   help="reuse variants whose out/<variant>/metrics.json was made with the same config")
    p.add_argument("--quiet", action="store_true", default=None, help="no progress bars")
    p.add_argument("--jobs", type=int, default=1,
                   help="train this many (variant, seed) runs at once in worker processes, spread over the "
                        "visible GPUs (several per GPU pay off for small models) or the CPU cores (default 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value for every variant, e.g. --set model.d_model=128 (repeatable)")
    p.set_defaults(func=cmd_ablate)


def cmd_ablate(a: argparse.Namespace) -> int:
    """Run the ablation from parsed CLI arguments."""
    from .train import resolve_config

    base = resolve_config(a.dataset, a.config, a.overrides, data=a.data, seeds=a.seeds or DEFAULT_SEEDS,
                          epochs=a.epochs, device=a.device, quiet=a.quiet)
    variants: list[str] = []
    for item in a.variants or list(VARIANTS):
        variants += [v for v in item.split(",") if v]
    if a.jobs < 1:
        from .errors import ConfigError
        raise ConfigError(f"--jobs: must be >= 1, got {a.jobs}")
    run_ablation(base, variants, a.out, resume=a.resume, jobs=a.jobs)
    return 0
