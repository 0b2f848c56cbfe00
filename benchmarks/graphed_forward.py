"""AlignMamba inference at batch 1: eager forward, ``graphs.GraphedForward`` and a bare replay.

``PYTHONPATH=. python benchmarks/graphed_forward.py [--lengths 65536 262144]`` on a CUDA device.
Same model and inputs as ``alignmamba bench`` (d 256, 4 layers, bf16 autocast, MOSI's 50:375:500
split, no padding). Per length: the median of 20 calls after warm-up (CUDA events) of the eager
forward, of ``GraphedForward`` (input copies into the graph's buffers + replay), and of the
replay alone (what ``alignmamba bench --cuda-graphs`` times); the largest difference between
the graphed and the eager prediction.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_scan import median_ms

from alignmamba.bench import WIDTHS, BenchSettings, _build, split_length
from alignmamba.graphs import GraphedForward


def measure(model: torch.nn.Module, length: int, reps: int) -> str:
    """One line: the three median times at ``length`` tokens and the prediction difference."""
    g = torch.Generator().manual_seed(length)
    feats = {m: torch.randn(1, n, WIDTHS[m], generator=g).cuda()
             for m, n in split_length(length).items()}

    def eager():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            return model(feats, None)

    fast = GraphedForward(model)
    diff = float((fast(feats).pred.float() - eager().pred.float()).abs().max())
    graph, _, _, _ = next(iter(fast._graphs.values()))
    times = {name: median_ms(fn, reps) for name, fn in
             (("eager", eager), ("GraphedForward", lambda: fast(feats)), ("replay", graph.replay))}
    return (f"  {length:7d} tokens: " + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items())
            + f"; max |graphed - eager| {diff:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[65536, 262144])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("graphed_forward: needs a CUDA device")
    torch.manual_seed(0)
    model = _build("alignmamba", BenchSettings(device="cuda", dtype="bf16", batch=1)).cuda().eval()
    print(torch.cuda.get_device_name())
    for length in args.lengths:
        print(measure(model, length, args.reps), flush=True)


if __name__ == "__main__":
    main()
