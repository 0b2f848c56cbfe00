"""Forward time of the Triton scan against the number of time segments (docs/KERNEL_NOTES.md v5, v7).

``PYTHONPATH=. python benchmarks/sweep_segments.py [--json F]``: the issue-6 shape (batch 8, D 1536,
N 16, L 16384, bf16) and AlignMamba's batch-1 shape at 64k tokens (D 512, L 10626), inference
forward, segments 1 .. 64 (and batch 8, D 512, L 6400: AlignMamba's training shape); prints ms and % of the copy bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_scan import byte_counts, copy_bandwidth, make_inputs, median_ms

from alignmamba.ssm import triton_scan as ts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()} | copy {bw:.0f} GB/s")
    rows = []
    for bsz, dim, length in ((8, 1536, 16384), (1, 512, 10626), (8, 512, 6400)):
        x = make_inputs(bsz, dim, 16, length)
        nbytes = byte_counts(x)["fwd"]
        cfg = ts.pick_fwd_config(dim)
        auto = ts.pick_segments(bsz, dim, 1, length, cfg, x["u"].device)
        for seg in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64):
            def fwd(seg=seg, x=x):
                with torch.no_grad():
                    ts.selective_scan_triton(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                             x["delta_bias"], True, False, segments=seg)
            ms = median_ms(fwd, a.reps)
            pct = 100 * nbytes / ms / 1e6 / bw
            rows.append({"batch": bsz, "dim": dim, "length": length, "segments": seg, "ms": ms,
                         "pct_copy": pct, "auto": seg == auto})
            print(f"B={bsz} D={dim} L={length} segments {seg:3d}: {ms:8.3f} ms  {pct:5.1f}% of copy"
                  + ("   <- pick_segments" if seg == auto else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "copy_gbs": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
