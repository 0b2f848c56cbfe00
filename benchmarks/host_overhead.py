"""Host (Python) time of one ``selective_scan_triton`` call, where the GPU work is negligible.

At a tiny shape (batch 1, D 64, N 16, L 64, bf16) a call's wall time is its host work: input
checks, kernel choice, buffer allocation, the launches. Prints the median per call for the
forward (inference), the forward that saves checkpoints, and forward + backward, then a cProfile
of the inference forward (``--profile``). ``PYTHONPATH=. python benchmarks/host_overhead.py``.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_scan import make_inputs


def per_call_us(fn, n: int = 200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / n * 1e6)
    return sorted(times)[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", action="store_true", help="cProfile the inference forward")
    ap.add_argument("--profile-bwd", action="store_true", help="cProfile forward + backward")
    args = ap.parse_args()
    from alignmamba.ssm.triton_scan import selective_scan_triton

    B, D, N, L = 1, 64, 16, 64
    x = make_inputs(B, D, N, L)
    leaves = {k: v.detach().requires_grad_(True) for k, v in x.items()}

    def call(t):
        return selective_scan_triton(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"],
                                     t["delta_bias"], delta_softplus=True)

    def infer():
        with torch.no_grad():
            call(x)

    def train_fwd():
        return call(leaves)

    def fwd_bwd():
        call(leaves).sum().backward()

    print(f"{torch.cuda.get_device_name()}: host time per call (us), batch {B}, D {D}, N {N}, L {L}")
    for name, fn in (("forward (inference)", infer), ("forward (saves checkpoints)", train_fwd),
                     ("forward + backward", fwd_bwd)):
        print(f"  {name:30s} {per_call_us(fn):8.1f}")
    for flag, fn in ((args.profile, infer), (args.profile_bwd, fwd_bwd)):
        if flag:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(200):
                fn()
            torch.cuda.synchronize()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
