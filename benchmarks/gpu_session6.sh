#!/usr/bin/env bash
# Third session, second GPU script: the segment-parallel backward (KERNEL_NOTES v8) and the
# v7 forward tiles, at the issue-6 shape (beside v5 from git) and at batch 1, D 512.
#   git show 6e1d37f:alignmamba/ssm/triton_scan.py > .device_carry/triton_scan_v5.py
#   OUT=/path bash benchmarks/gpu_session6.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date
  echo "== issue-6 shape"
  timeout 240 python benchmarks/bench_scan.py --reps 10 --sweep --other .device_carry/triton_scan_v5.py --json "$OUT/scan_v8.json"
  echo "== batch 1, D 512, L 10626"; date
  timeout 120 python benchmarks/bench_scan.py --reps 10 --sweep --batch 1 --dim 512 --length 10626 --no-torch --other .device_carry/triton_scan_v5.py --json "$OUT/scan_v8_b1.json"
  date
} > "$OUT/session6.txt" 2>&1
cat "$OUT/session6.txt"
