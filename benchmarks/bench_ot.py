"""The relaxed-OT argmax: torch tiling against the fused Triton kernel (alignmamba.ot_kernel).

``PYTHONPATH=. python benchmarks/bench_ot.py [--reps 20] [--json out.json]`` on a CUDA device.
Times ``relaxed_ot_assign`` (the argmax and the weights) for both kernels at AlignMamba's
shapes: batch 1 at 64k total tokens (text anchor 3542, audio 26569, vision 35425 tokens: the
MOSI unaligned 50:375:500 split of ``alignmamba bench``) and batch 32 at 6.4k, d 256, bf16
autocast and fp32; median of ``--reps`` calls after warm-up, CUDA events; peak memory of one
call above what was allocated before it. The count of indices where the two differ is reported:
in fp32 only near-ties can differ (the sums run in another order; tests/test_ot_kernel.py holds
them equal at small sizes), in bf16 the torch tiling compares similarities rounded to bf16 and
the fused kernel their fp32 sums.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_scan import median_ms

from alignmamba import alignment as al


def timed(fn, reps: int) -> tuple[float, int]:
    """(median ms of ``reps`` calls, peak bytes of one call above what was allocated before)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return median_ms(fn, reps, warmup=0), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_ot: needs a CUDA device")
    dev = torch.device("cuda")
    shapes = [("batch 1, 64k tokens, audio", 1, 26569, 3542),
              ("batch 1, 64k tokens, vision", 1, 35425, 3542),
              ("batch 32, 6.4k tokens, audio", 32, 2595, 346),
              ("batch 32, 6.4k tokens, vision", 32, 3459, 346)]
    rows = []
    print(f"{torch.cuda.get_device_name()} | d {args.dim} | relaxed_ot_assign, median ms "
          f"(peak MiB above the inputs)")
    for dtype in (torch.bfloat16, torch.float32):
        for name, bsz, ts_len, ta_len in shapes:
            g = torch.Generator(device=dev).manual_seed(0)
            src = torch.randn(bsz, ts_len, args.dim, device=dev, generator=g)
            anc = torch.randn(bsz, ta_len, args.dim, device=dev, generator=g)
            res = {}
            for kernel in ("torch", "triton"):
                def call(k=kernel, x=src, y=anc, half=dtype == torch.bfloat16):
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=half):
                        return al.relaxed_ot_assign(x, y, kernel=k)
                ms, peak = timed(call, args.reps)
                res[kernel] = (ms, peak, call()[0])
            differ = int((res["torch"][2] != res["triton"][2]).sum())
            row = {"shape": name, "batch": bsz, "t_src": ts_len, "t_anchor": ta_len,
                   "dtype": str(dtype).replace("torch.", ""),
                   "torch_ms": res["torch"][0], "triton_ms": res["triton"][0],
                   "speedup": res["torch"][0] / res["triton"][0],
                   "torch_peak_MiB": res["torch"][1] / 2**20,
                   "triton_peak_MiB": res["triton"][1] / 2**20, "indices_differ": differ}
            rows.append(row)
            print(f"  {row['dtype']:8s} {name:30s} torch {row['torch_ms']:7.3f} "
                  f"({row['torch_peak_MiB']:6.1f})  triton {row['triton_ms']:7.3f} "
                  f"({row['triton_peak_MiB']:5.1f})  {row['speedup']:5.2f}x  differ {differ}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d"), "dim": args.dim, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
