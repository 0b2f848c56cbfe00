#!/usr/bin/env bash
# Fifth session, first GPU run: the CUDA forward (KERNEL_NOTES v10) against float64 on the card,
# then the issue-6 shape with the Triton forward in the same run and a segment / register-budget
# sweep, and AlignMamba's 64k scan shape (batch 1, D 512) for the segmented path.
#   OUT=/path bash benchmarks/gpu_session10.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date
  echo "== CUDA forward tests"
  timeout 200 python -m pytest -p no:cacheprovider -p no:warnings tests/test_triton_scan.py -k "cuda_forward or default_config_large" -x 2>&1 | tail -n 15
  echo "== issue-6 shape"; date
  timeout 150 python benchmarks/bench_scan.py --reps 10 --no-torch --fwd-segs 0 1 2 --fwd-opts MINB=4 MINB=3 --json "$OUT/scan_v10a.json"
  echo "== batch 1, D 512, L 65536"; date
  timeout 100 python benchmarks/bench_scan.py --batch 1 --dim 512 --length 65536 --reps 10 --no-torch --fwd-segs 0 1 8 16 32 64 --json "$OUT/scan_v10a_b1.json"
  date
} > "$OUT/session10.txt" 2>&1
cat "$OUT/session10.txt"
