"""Summarise an Nsight Compute SASS page (``ncu -i rep --page source --csv --print-source sass``):
warp instructions executed per opcode and the share of each stall reason in the samples.

``python benchmarks/ncu_summary.py ncu_sass.csv`` (the v9_run*_ncu_sass_summary.txt files).
"""
from __future__ import annotations

import collections
import csv
import sys


def main(path: str) -> None:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    hdr = next(i for i, r in enumerate(rows) if "Source" in r and "Address" in r)
    head = rows[hdr]
    col = {k: i for i, k in enumerate(head)}
    stall_cols = [k for k in head if k.startswith("stall_") and "Not Issued" not in k]
    total, by_op, stalls = 0, collections.Counter(), collections.Counter()
    for r in rows[hdr + 1:]:
        if len(r) < len(head) or not r[col["Source"]].split():
            continue
        try:
            n = int(r[col["Instructions Executed"]] or 0)
        except ValueError:
            continue
        toks = r[col["Source"]].split()
        op = (toks[1] if toks[0].startswith("@") else toks[0]).split(".")[0]
        total += n
        by_op[op] += n
        for k in stall_cols:
            try:
                stalls[k] += float(r[col[k]] or 0)
            except ValueError:
                pass
    print("total", total)
    for op, n in by_op.most_common(22):
        print(f"{op:10s} {n / 1e6:8.1f}M {100 * n / total:5.1f}%")
    s = sum(stalls.values())
    for k, v in stalls.most_common(8):
        print(k, f"{100 * v / s:.1f}%")


if __name__ == "__main__":
    main(sys.argv[1])
