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


def _reusable(cfg, directory: Path) -> dict[str, Any] | None:
    """metrics.json of a finished earlier run of exactly this config (``--resume``), else None."""
    from .config import to_dict

    mpath, cpath = directory / "metrics.json", directory / "config.json"
    if not (mpath.is_file() and cpath.is_file()):
        return None
    try:
        old = json.loads(cpath.read_text())
        metrics = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    new = to_dict(cfg)
    # run_experiment stores the model section after fitting it to the data (input widths,
    # modality order); compare everything else exactly and the model's own choices key by key.
    same = all(old.get(k) == new[k] for k in new if k != "model")
    same = same and all(old.get("model", {}).get(k) == v for k, v in new["model"].items()
                        if k not in ("input_dims", "modalities", "interleave_order"))
    return metrics if same and "test" in metrics else None


def run_ablation(base, variants: list[str], out: str | Path, resume: bool = False,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every variant of ``variants`` on ``base`` (an ExperimentConfig); write and return the table.

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
    rows: list[dict[str, Any]] = []
    data_source = None
    for i, name in enumerate(variants, 1):
        cfg = configs[name]
        log(f"== [{i}/{len(variants)}] {name}: {DESCRIPTIONS[name]}  ({' '.join(VARIANTS[name]) or 'no overrides'})")
        metrics = _reusable(cfg, Path(cfg.train.out)) if resume else None
        if metrics is not None:
            log(f"   reusing {cfg.train.out}/metrics.json (same config)")
        else:
            metrics = run_experiment(cfg, log=lambda text, _n=name: log(
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
    run_ablation(base, variants, a.out, resume=a.resume)
    return 0
