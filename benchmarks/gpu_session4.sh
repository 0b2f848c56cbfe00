#!/usr/bin/env bash
# Final GPU figures of 2026-11-27 (second session): CUDA-graph tests, batch-1 curves eager and
# graphed (every model), the paper's batch-32 6.4k point eager and graphed.
#   OUT=/path bash benchmarks/gpu_session4.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date
  echo "== tests/test_graphs.py"
  timeout 120 python -m pytest -rs -p no:cacheprovider tests/test_graphs.py 2>&1 | grep -E "passed|failed|SKIP|FAILED|Error" | tail -n 8
  B="python -m alignmamba bench --device cuda --dtype bf16 --repeats 10 --warmup 3"
  echo "== batch 1 eager"; date
  timeout 150 $B --batch 1 --json "$OUT/gpu_b1.json" --plot "$OUT/gpu_b1.png" 2>&1 | grep -v "^|"
  echo "== batch 1 CUDA graphs"; date
  timeout 150 $B --batch 1 --cuda-graphs --json "$OUT/gpu_b1_graphs.json" --plot "$OUT/gpu_b1_graphs.png" 2>&1 | grep -v "^|"
  echo "== batch 32 at 6.4k, eager and graphed"; date
  timeout 60 $B --batch 32 --lengths 6400 --json "$OUT/gpu_b32.json" 2>&1 | grep -v "^|"
  timeout 60 $B --batch 32 --lengths 6400 --cuda-graphs --json "$OUT/gpu_b32_graphs.json" 2>&1 | grep -v "^|"
  date
} > "$OUT/session4.txt" 2>&1
cat "$OUT/session4.txt"
