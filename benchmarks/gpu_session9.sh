#!/usr/bin/env bash
# Fourth session, final GPU script: the compiled kernel/model tests with the CUDA backward
# (KERNEL_NOTES v9) as the default, the issue-6 scan bench (the Triton backward kernel timed in
# the same run) and the MOSI-sized epoch (training runs the backward).
#   OUT=/path bash benchmarks/gpu_session9.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date
  echo "== compiled tests"
  timeout 330 python -m pytest -p no:cacheprovider -p no:warnings tests/test_triton_scan.py tests/test_ssm.py tests/test_graphs.py tests/test_nvrtc.py 2>&1 | tail -n 6
  echo "== issue-6 shape"; date
  timeout 150 python benchmarks/bench_scan.py --reps 10 --bwd-segs 0 1 16 --json "$OUT/scan_v9_final.json"
  echo "== MOSI-sized epoch"; date
  timeout 240 python benchmarks/mosi_epoch.py --json "$OUT/mosi_epoch_v9.json" 2>&1 | tail -n 12
  date
} > "$OUT/session9.txt" 2>&1
cat "$OUT/session9.txt"
