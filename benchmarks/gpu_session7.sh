#!/usr/bin/env bash
# Third session, final GPU script: compiled kernel/model tests, the issue-6 scan bench with the
# default segment choices (beside v5 from git), AlignMamba at 64k tokens (batch 1, eager and
# CUDA-graphed, vs both Transformers) and the MOSI-sized epoch.
#   git show 6e1d37f:alignmamba/ssm/triton_scan.py > .device_carry/triton_scan_v5.py
#   OUT=/path bash benchmarks/gpu_session7.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date
  echo "== compiled tests"
  timeout 300 python -m pytest -p no:cacheprovider -p no:warnings tests/test_triton_scan.py tests/test_ssm.py tests/test_graphs.py 2>&1 | tail -n 4
  echo "== issue-6 shape"; date
  timeout 150 python benchmarks/bench_scan.py --reps 10 --other .device_carry/triton_scan_v5.py --json "$OUT/scan_final.json"
  echo "== AlignMamba at 64k tokens, batch 1"; date
  M="--models alignmamba transformer_single transformer_multi"
  B="python -m alignmamba bench --device cuda --dtype bf16 --repeats 10 --warmup 3 --batch 1 --lengths 65536"
  timeout 120 $B $M --json "$OUT/b1_64k.json" 2>&1 | grep -v "^|"
  timeout 150 $B $M --cuda-graphs --json "$OUT/b1_64k_graphs.json" 2>&1 | grep -v "^|"
  echo "== MOSI-sized epoch"; date
  timeout 240 python benchmarks/mosi_epoch.py --json "$OUT/mosi_epoch.json" 2>&1 | tail -n 12
  date
} > "$OUT/session7.txt" 2>&1
cat "$OUT/session7.txt"
