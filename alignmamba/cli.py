"""Command line: ``alignmamba train | evaluate | data | plot-plan | ablate | bench``.

Every user mistake surfaces as one line on stderr and exit code 2 (AlignMambaError);
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from . import ablate, bench
from .errors import AlignMambaError, ConfigError


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train and evaluate (default: the embedded synthetic MOSI-like data)")
    p.add_argument("--config", help="YAML or JSON config file (sections model/data/optim/train)")
    p.add_argument("--dataset", choices=["mosi", "mosei", "synthetic"], help="preset (default synthetic)")
    p.add_argument("--data", help="MMSA or MulT feature pickle")
    p.add_argument("--model", help="model name (alignmamba, transformer_single, ...)")
    p.add_argument("--out", help="output directory (default runs/latest)")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (mean/std over them)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--missing-protocol", dest="missing_protocol", choices=["none", "imder", "tokens"])
    p.add_argument("--missing-rate", dest="missing_rate", type=float,
                   help="training missing rate (negative: drawn in [0.1, 0.7] per batch)")
    p.add_argument("--quiet", action="store_true", default=None, help="no progress bar")
    p.add_argument("--text-encoder", dest="text_encoder", choices=["features", "bert"],
                   help="features: the file's frozen text features (default); bert: fine-tune the BERT of "
                        "--bert-path on the file's text_bert token ids (needs alignmamba[bert]; docs/BERT.md)")
    p.add_argument("--bert-path", dest="bert_path", metavar="DIR",
                   help="local BERT directory (e.g. bert-base-uncased), read with local_files_only")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. --set model.d_model=128 (repeatable)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the interrupted run in DIR: its config.json decides everything, so no "
                        "other option may be given except --quiet; finished seeds are kept")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="data-parallel training in N processes (one per GPU, or CPU processes with --device "
                        "cpu): runs this command under torch.distributed.run; data.batch_size stays the "
                        "global batch (docs/DISTRIBUTED.md)")
    p.add_argument("--seeds-parallel", dest="seed_parallel", action="store_true", default=None,
                   help="train the seeds at the same time, one process per seed, one seed per GPU "
                        "(train.seed_parallel=true)")
    p.add_argument("--cuda-graphs", dest="cuda_graphs", action="store_true", default=None,
                   help="on CUDA, replay forward and backward of full batches as CUDA graphs "
                        "(train.cuda_graphs=true; falls back to eager with a warning where unsupported)")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="PyTorch's deterministic algorithms: a CUDA run repeats bitwise on the same machine "
                        "and software, somewhat slower (train.deterministic=true)")
    p.set_defaults(func=cmd_train)


# the train options that --resume refuses (DIR/config.json decides them)
_RESUME_CONFLICTS = {"config": "--config", "dataset": "--dataset", "data": "--data", "model": "--model",
                     "out": "--out", "seeds": "--seeds", "epochs": "--epochs", "device": "--device",
                     "missing_protocol": "--missing-protocol", "missing_rate": "--missing-rate",
                     "text_encoder": "--text-encoder", "bert_path": "--bert-path", "overrides": "--set",
                     "seed_parallel": "--seeds-parallel", "cuda_graphs": "--cuda-graphs",
                     "deterministic": "--deterministic"}


def cmd_train(a: argparse.Namespace) -> int:
    from . import distributed
    from .train import resolve_config, run_experiment

    if getattr(a, "resume", None):
        given = [flag for key, flag in _RESUME_CONFLICTS.items() if getattr(a, key, None)]
        if given:
            raise ConfigError(f"--resume {a.resume}: takes no other options (the run's config.json decides), "
                              f"got {given[0]}")
        from .train import resume_config
        cfg = resume_config(a.resume, quiet=a.quiet)
        if a.nproc is not None:  # --resume DIR --nproc N: the same under torch.distributed.run
            return distributed.launch_torchrun(cfg, a.argv, a.nproc)
        try:
            run_experiment(cfg, resume=True)
        finally:
            distributed.teardown()
        return 0
    cfg = resolve_config(a.dataset, a.config, a.overrides, data=a.data, out=a.out, seeds=a.seeds,
                         epochs=a.epochs, device=a.device, quiet=a.quiet, model=a.model,
                         missing_protocol=a.missing_protocol, missing_rate=a.missing_rate,
                         text_encoder=a.text_encoder, bert_path=a.bert_path, seed_parallel=a.seed_parallel,
                         cuda_graphs=a.cuda_graphs, deterministic=a.deterministic)
    if a.nproc is not None:
        return distributed.launch_torchrun(cfg, a.argv, a.nproc)
    try:
        run_experiment(cfg)
    finally:
        distributed.teardown()  # a torchrun worker leaves its process group
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a data file")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--data", help="feature pickle (default: the synthetic data the checkpoint was trained on)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="write the metrics to this JSON file")
    p.add_argument("--missing-rates", dest="missing_rates",
                   help="comma-separated missing rates, e.g. 0.1,0.2,...,0.7 (incomplete setting)")
    p.add_argument("--missing-protocol", dest="missing_protocol", default="imder", choices=["imder", "tokens"])
    p.add_argument("--missing-seed", dest="missing_seed", type=int, default=0)
    p.add_argument("--plot", help="PNG of accuracy against missing rate (with --missing-rates)")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint

    evaluate_checkpoint(a)
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="generate or inspect feature files")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    s = dsub.add_parser("synth", help="write a synthetic pickle in the MMSA schema")
    s.add_argument("--like", choices=["mosi", "mosei"], default="mosi")
    s.add_argument("--out", required=True, help="output .pkl path")
    s.add_argument("--aligned", action="store_true", help="aligned (all modalities 50 steps)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n-train", dest="n_train", type=int)
    s.add_argument("--n-valid", dest="n_valid", type=int)
    s.add_argument("--n-test", dest="n_test", type=int)
    s.set_defaults(func=cmd_data_synth)
    i = dsub.add_parser("inspect", help="splits, shapes, label and length statistics, anything suspicious")
    i.add_argument("file")
    i.set_defaults(func=cmd_data_inspect)


def cmd_data_synth(a: argparse.Namespace) -> int:
    from .data.synthetic import write_synthetic

    write_synthetic(a.out, like=a.like, aligned=a.aligned, seed=a.seed,
                    n_train=a.n_train, n_valid=a.n_valid, n_test=a.n_test)
    print(f"wrote {a.out}")
    return 0


def cmd_data_inspect(a: argparse.Namespace) -> int:
    from .data.inspect import inspect_report

    print(inspect_report(a.file))
    return 0


def _add_plot_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot-plan", help="heatmaps of the learned transport plans (paper Figure 5)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", help="feature pickle (default: the checkpoint's synthetic data)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--index", type=int, default=0, help="sample index in the split")
    p.add_argument("--out", required=True, help="output PNG")
    p.set_defaults(func=cmd_plot_plan)


def cmd_plot_plan(a: argparse.Namespace) -> int:
    from .evaluate import plot_plan

    plot_plan(a)
    return 0


# Sub-commands, each a function that adds its parser. Extending the CLI is one line here.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_train, _add_evaluate, _add_data, _add_plot_plan, ablate.add_parser, bench.add_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignmamba", description="AlignMamba multimodal fusion: train, "
                                     "evaluate, ablate and benchmark on MOSI/MOSEI-style feature files.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"alignmamba {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with a one-line usage error
    args.argv = [str(v) for v in (sys.argv[1:] if argv is None else argv)]  # for train --nproc
    try:
        return int(args.func(args) or 0)
    except AlignMambaError as e:
        print(f"alignmamba: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alignmamba: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
