"""The OT aggregation under torch.use_deterministic_algorithms (CUDA): does scatter-add raise,
do repeated calls give the same bits, and what the deterministic index-add costs.

    PYTHONPATH=. python benchmarks/deterministic_ot.py     # needs a CUDA device
"""
from __future__ import annotations

import os
import time

import torch

from alignmamba import alignment as al


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("deterministic_ot: needs a CUDA device")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    dev = "cuda"
    print(torch.__version__, torch.cuda.get_device_name())
    g = torch.Generator(device=dev).manual_seed(0)
    out = torch.zeros(4, 300, 64, device=dev)
    idx = torch.randint(0, 300, (4, 5000), device=dev, generator=g)  # 5,000 sources onto 300 rows
    vals = torch.randn(4, 5000, 64, device=dev, generator=g)
    torch.use_deterministic_algorithms(True)
    try:
        try:
            out.scatter_add(1, idx[..., None].expand(-1, -1, 64), vals)
            print("scatter_add 3-D under deterministic mode: runs")
        except RuntimeError as e:
            print("scatter_add 3-D under deterministic mode: raises:", str(e).splitlines()[0][:160])
        a = [al._add_at(out, idx, vals) for _ in range(3)]
        print("index_add path repeats bitwise:", all(torch.equal(a[0], x) for x in a[1:]))
        torch.use_deterministic_algorithms(False)
        b = [al._add_at(out, idx, vals) for _ in range(5)]
        print("scatter path repeats bitwise (5 runs):", all(torch.equal(b[0], x) for x in b[1:]),
              "max diff to index path:", (b[0] - a[0]).abs().max().item())
        for det in (False, True, False, True):  # new / old / new / old
            torch.use_deterministic_algorithms(det)
            for _ in range(3):
                al._add_at(out, idx, vals)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(50):
                al._add_at(out, idx, vals)
            torch.cuda.synchronize()
            print(f"_add_at det={det}: {(time.perf_counter() - t) / 50 * 1e3:.3f} ms")
    finally:
        torch.use_deterministic_algorithms(False)


if __name__ == "__main__":
    main()
