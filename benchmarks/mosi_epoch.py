"""MOSI-sized training epoch (issue 6): eager pure-PyTorch scan vs eager Triton scan vs CUDA graphs.

Runs the real training loop (``alignmamba.train.train_one_seed``) on MOSI-sized synthetic data
(1,284 training / 229 validation clips, unaligned 50x768 text / 375x5 audio / 500x20 vision,
batch 32, the ``synthetic`` preset's model: d_model 48, 2 layers, d_state 8) for
``--epochs`` epochs (default 4) and reads each epoch's ``seconds`` from log.csv: training plus
validation, exactly what a user's run spends per epoch. The first epoch is the warm-up (Triton
compilation, graph capture); the figure is the median of the others.

Modes (the same data, seed and config otherwise):
  a  eager step, ``model.scan_backend=torch`` (the pure-PyTorch chunked scan): the baseline
  b  eager step, scan backend auto (Triton on CUDA when importable)
  c  ``train.cuda_graphs=true``, scan backend auto (CUDA only; skipped elsewhere)
  d, e  b and c with ``train.deterministic=true`` (not in the default ``--modes abc``)

    python benchmarks/mosi_epoch.py --json mosi_epoch.json        # on the GPU
    python benchmarks/mosi_epoch.py --small --device cpu          # tiny sizes, checks the script
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from alignmamba import train as T

MODES: dict[str, tuple[str, list[str]]] = {
    "a": ("eager, torch scan", ["model.scan_backend=torch"]),
    "b": ("eager, auto scan", ["model.scan_backend=auto"]),
    "c": ("cuda graphs, auto scan", ["model.scan_backend=auto", "train.cuda_graphs=true"]),
    "d": ("eager, auto scan, deterministic", ["model.scan_backend=auto", "train.deterministic=true"]),
    "e": ("cuda graphs, auto scan, deterministic", ["model.scan_backend=auto", "train.cuda_graphs=true",
                                                    "train.deterministic=true"]),
}

MOSI = ["data.synthetic_n_train=1284", "data.synthetic_n_valid=229", "data.synthetic_n_test=686",
        "data.batch_size=32"]
SMALL = ["data.synthetic_n_train=96", "data.synthetic_n_valid=32", "data.synthetic_n_test=16",
         "data.batch_size=16", "model.d_model=16", "model.n_layers=1", "model.d_state=4"]


def versions() -> dict[str, Any]:
    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_v, "gpu": gpu,
            "python": platform.python_version(), "cpu_threads": torch.get_num_threads()}


def run_mode(key: str, base: list[str], ds: Any, epochs: int, workdir: Path) -> dict[str, Any]:
    """Train one seed in mode ``key``; per-epoch seconds and losses from its log.csv."""
    name, extra = MODES[key]
    cfg = T.resolve_config("synthetic", overrides=[*base, *extra, f"train.epochs={epochs}"])
    out = workdir / f"mode_{key}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        T.train_one_seed(cfg, ds, cfg.train.seeds[0], out, log=lambda *a: None)
        total = time.perf_counter() - t0
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    secs = [float(r["seconds"]) for r in rows]
    timed = secs[1:] if len(secs) > 1 else secs
    return {"name": name, "overrides": extra, "epoch_seconds": secs, "median_s": statistics.median(timed),
            "first_epoch_s": secs[0], "train_loss": [float(r["train_loss"]) for r in rows],
            "valid_loss": [float(r["valid_loss"]) for r in rows], "run_seconds": total,
            "warnings": sorted({str(w.message) for w in caught})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--small", action="store_true", help="tiny data and model (CPU check of the script)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per mode; the first is the warm-up")
    ap.add_argument("--modes", default="abc", help="which of a, b, c, d, e to run (default abc)")
    ap.add_argument("--no-amp", action="store_true", help="fp32 (default: bf16 autocast on CUDA)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.epochs < 2:
        ap.error("--epochs: need at least 2 (one warm-up epoch)")
    if set(args.modes) - set(MODES):
        ap.error(f"--modes: use letters from {''.join(MODES)}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    base = [*(SMALL if args.small else MOSI), "train.patience=1000", "train.quiet=true", "train.seeds=[1111]",
            f"train.device={args.device}", f"train.amp={'false' if args.no_amp else 'true'}"]
    probe = T.resolve_config("synthetic", overrides=base)
    device = T.pick_device(probe.train.device)
    t0 = time.perf_counter()
    ds = T.load_experiment_data(probe)
    gen_s = time.perf_counter() - t0
    info = versions()
    print(f"device {device} ({info['gpu'] or platform.processor() or 'cpu'}), torch {info['torch']}, "
          f"triton {info['triton']}; data: {len(ds.splits['train'])} train / {len(ds.splits['valid'])} valid "
          f"clips, generated in {gen_s:.1f}s", flush=True)
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="mosi_epoch_") as tmp:
        for key in args.modes:
            if "train.cuda_graphs=true" in MODES[key][1] and device.type != "cuda":
                skipped[key] = f"CUDA graphs need CUDA (device {device})"
                continue
            results[key] = r = run_mode(key, base, ds, args.epochs, Path(tmp))
            print(f"  ({key}) {r['name']}: epochs {', '.join(f'{s:.3f}' for s in r['epoch_seconds'])} s",
                  flush=True)
    ref = results.get("a", {}).get("median_s")
    for r in results.values():
        r["speedup_vs_a"] = ref / r["median_s"] if ref else None
    print(f"\nMOSI-sized epoch ({'small' if args.small else 'full'} sizes, train + validation), "
          f"median of epochs 2..{args.epochs}:")
    print(f"{'mode':<42}{'epoch s':>10}{'first s':>10}{'vs (a)':>9}")
    for key, r in results.items():
        sp = f"{r['speedup_vs_a']:.2f}x" if r["speedup_vs_a"] else "-"
        print(f"({key}) {r['name']:<38}{r['median_s']:>10.3f}{r['first_epoch_s']:>10.3f}{sp:>9}")
    for key, why in skipped.items():
        print(f"({key}) {MODES[key][0]:<38}  skipped: {why}")
    for key, r in results.items():
        for w in r["warnings"]:
            print(f"  ({key}) warning: {w}")
    if args.json:
        doc = {"benchmark": "mosi_epoch", "device": str(device), **info, "small": args.small,
               "epochs": args.epochs, "amp": not args.no_amp, "data_seconds": gen_s,
               "config": base, "modes": results, "skipped": skipped}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
