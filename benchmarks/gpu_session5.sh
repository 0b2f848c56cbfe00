#!/usr/bin/env bash
# Third session, first GPU call: the v7 forward scan (one channel per thread; KERNEL_NOTES v7).
# Compiled tests, the issue-6 scan bench beside the previous version (v5, from git) in the same
# run, the tile / segment sweeps.
#   git show 6e1d37f:alignmamba/ssm/triton_scan.py > .device_carry/triton_scan_v5.py
#   OUT=/path bash benchmarks/gpu_session5.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader; date
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "== compiled tests"
  [ -n "${SKIP_TESTS:-}" ] || timeout 240 python -m pytest -p no:cacheprovider -p no:warnings tests/test_triton_scan.py tests/test_ssm.py > "$OUT/tests.txt" 2>&1; tail -n 15 "$OUT/tests.txt"
  echo "== bench_scan (issue-6 shape), previous version beside it"; date
  timeout 200 python benchmarks/bench_scan.py --reps 10 --sweep --other "${OTHER:-.device_carry/triton_scan_v5.py}" --json "$OUT/scan_v7.json"
  echo "== segments"; date
  timeout 150 python benchmarks/sweep_segments.py --reps 5 --json "$OUT/segments_v7.json"
  date
} > "$OUT/session5.txt" 2>&1
cat "$OUT/session5.txt"
