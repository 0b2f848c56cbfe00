#!/usr/bin/env bash
# Fourth session, first GPU script: the CUDA backward (NVRTC, KERNEL_NOTES v9) against float64
# on the GPU, then the issue-6 shape with the CUDA backward at several segment counts beside
# the Triton backward in the same run.
#   OUT=/path bash benchmarks/gpu_session8.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "== CUDA backward tests"
  timeout 240 python -m pytest -p no:cacheprovider -p no:warnings tests/test_triton_scan.py -x -k "cuda_backward or cuda_default or default_tiles" 2>&1 | tail -n 25
  echo "== issue-6 shape"; date
  timeout 240 python benchmarks/bench_scan.py --reps 10 --no-torch --bwd-segs 0 1 2 4 8 11 16 --json "$OUT/scan_v9.json"
  date
} > "$OUT/session8.txt" 2>&1
cat "$OUT/session8.txt"
