#!/usr/bin/env bash
# Issue 6 on one GPU after the launch-bound fixes (budget-sized OT/MMD blocks, segment-parallel
# scan forward, CUDA graphs): compiled kernel tests, the CUDA-graph training check and MOSI epoch,
# a profile at 64k tokens, batch-1 inference eager and graphed, the scan kernel alone.
#   OUT=/path bash benchmarks/gpu_session2.sh        (writes at most 8 files to $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$OUT/session2.txt"
{
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "== compiled kernel tests"; date
  timeout 150 python -m pytest -q -p no:cacheprovider tests/test_triton_scan.py tests/test_ssm.py 2>&1 | tail -n 15
  echo "== profile 64k"; date
  timeout 90 python benchmarks/profile_gpu.py --length 65536 --rows 25 2>&1 | grep -v Warning
  echo "== bench batch 1, eager"; date
  timeout 150 python -m alignmamba bench --device cuda --dtype bf16 --batch 1 --repeats 10 --warmup 3 \
      --lengths 6400,25600,65536 --models alignmamba transformer_single transformer_multi \
      --json "$OUT/b1.json" 2>&1 | grep -v "^|"
  echo "== bench batch 1, CUDA graphs"; date
  timeout 150 python -m alignmamba bench --device cuda --dtype bf16 --batch 1 --repeats 10 --warmup 3 \
      --lengths 6400,25600,65536 --models alignmamba transformer_single transformer_multi --cuda-graphs \
      --json "$OUT/b1g.json" 2>&1 | grep -v "^|"
  echo "== scan kernel alone"; date
  timeout 120 python benchmarks/bench_scan.py --reps 10 --json "$OUT/scan.json" 2>&1 | tail -n 25
  date
} > "$LOG" 2>&1
echo "== CUDA-graph training check + MOSI epoch" >> "$LOG"
OUT="$OUT" timeout 280 bash benchmarks/gpu_graphs_check.sh >> "$LOG" 2>&1
date >> "$LOG"
tail -n 40 "$LOG"
