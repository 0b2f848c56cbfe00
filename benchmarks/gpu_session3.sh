#!/usr/bin/env bash
# Final issue-6 checks on one GPU: CUDA-graph tests, the MOSI-sized epoch (eager torch scan /
# eager Triton / CUDA graphs), and the paper's point (batch 32, 6.4k tokens) eager and graphed.
#   OUT=/path bash benchmarks/gpu_session3.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date
  echo "== tests/test_graphs.py"
  timeout 150 python -m pytest -q -rs -p no:cacheprovider tests/test_graphs.py 2>&1 | tail -n 8
  echo "== MOSI-sized epoch"; date
  timeout 150 python benchmarks/mosi_epoch.py --json "$OUT/mosi_epoch.json" 2>&1 | grep -v "_warn_once\|UserWarning"
  echo "== batch 32, 6.4k tokens, eager then CUDA graphs"; date
  for g in "" "--cuda-graphs"; do
    timeout 90 python -m alignmamba bench --device cuda --dtype bf16 --batch 32 --repeats 10 --warmup 3 \
        --lengths 6400 --models alignmamba transformer_single transformer_multi $g \
        --json "$OUT/b32${g:+_graphs}.json" 2>&1 | grep -v "^|"
  done
  date
} > "$OUT/session3.txt" 2>&1
cat "$OUT/session3.txt"
