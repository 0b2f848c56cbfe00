"""Scan launches for Nsight Compute (stall reasons per SASS line): the forward, or with
``--backward KERNEL`` the backward ("cuda": KERNEL_NOTES v9, or "triton") from one forward's
checkpoints.

``ncu -k regex:ssm_fwd -o rep python benchmarks/ncu_fwd.py [--batch B --dim D --length L]
[--kernel cuda|triton]`` (``-k regex:ssm_bwd`` with ``--backward cuda``) then
``ncu -i rep.ncu-rep --page source --csv --print-source sass``. The forward runs the single pass
without and with state checkpoints (issue-6 shape by default), the backward one launch; each after
one warm-up (the first call compiles).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_scan import bwd_setup, make_inputs, run_bwd

from alignmamba.ssm import triton_scan as ts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--segments", type=int, default=1)
    ap.add_argument("--kernel", default="cuda", choices=("cuda", "triton"),
                    help="the forward kernel (KERNEL_NOTES v10 or v7)")
    ap.add_argument("--backward", default=None, choices=("cuda", "triton"),
                    help="profile this backward kernel instead of the forward")
    a = ap.parse_args()
    x = make_inputs(a.batch, a.dim, 16, a.length)
    u, delta, A, B, C, D, z, bias = (x[k] for k in ("u", "delta", "A", "B", "C", "D", "z",
                                                  "delta_bias"))
    Bg, Cg, _ = ts._check(u, delta, A, B, C, D, z, bias, None)
    cf = ts.pick_fwd_config(a.dim)
    if a.backward:
        sb, dout = bwd_setup(x), torch.randn_like(u)
        cb = ts.pick_config(16, a.dim, True, 4, 16)
        for _ in range(2):
            run_bwd(sb, dout, cb, a.segments, a.backward)
        torch.cuda.synchronize()
        return
    for ck in (False, True):
        for _ in range(2):  # the first compiles; ncu profiles every matching launch
            ts._fwd(u, delta, A, Bg, Cg, D, z, bias, None, True, False, ck, cf, a.segments,
                    a.kernel)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
