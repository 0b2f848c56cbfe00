#!/usr/bin/env bash
# Sixth session (KERNEL_NOTES v11: the backward in the forward's layout, ssm_bwd4):
#   OUT=/path bash benchmarks/gpu_session13.sh check  # the CUDA scan tests; v11 against v9 at
#       the issue shape in one run; Nsight Compute on v11 (L = 2048)
#   OUT=/path bash benchmarks/gpu_session13.sh tests  # the compiled kernel and model test files
#   OUT=/path bash benchmarks/gpu_session13.sh bench  # final figures: issue shape (v11, v9,
#       Triton and PyTorch in one run), batch 1 x D 512 x 64k, AlignMamba at 64k, MOSI epoch
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYT="python -m pytest -p no:cacheprovider -p no:warnings -q"
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date
  case "$1" in
  check)
    timeout 280 $PYT tests/test_triton_scan.py -k cuda 2>&1 | tail -n 25
    echo "== issue shape, backward v11 vs v9"; date
    timeout 150 python benchmarks/bench_scan.py --reps 10 --no-torch --bwd-segs 0 --bwd-ver 11 9 --inner 3 \
      --json "$OUT/scan_v11_check.json" 2>&1 | tail -n 22
    echo "== ncu v11"; date
    timeout 120 bash benchmarks/gpu_ncu_cuda.sh bwd --length 2048 2>&1 | tail -n 70 ;;
  tests)
    timeout 540 $PYT tests/test_triton_scan.py tests/test_ssm.py tests/test_graphs.py tests/test_nvrtc.py 2>&1 | tail -n 12 ;;
  bench)
    echo "== issue shape"; date
    timeout 200 python benchmarks/bench_scan.py --reps 10 --bwd-segs 0 --bwd-ver 11 9 --json "$OUT/scan_v11_final.json" 2>&1 | tail -n 22
    echo "== batch 1, D 512, L 65536"; date
    timeout 60 python benchmarks/bench_scan.py --batch 1 --dim 512 --length 65536 --reps 10 --no-torch --bwd-segs 0 --bwd-ver 11 9 --json "$OUT/scan_v11_final_b1.json" 2>&1 | tail -n 16
    echo "== AlignMamba at 64k tokens, batch 1"; date
    M="--models alignmamba transformer_single transformer_multi"
    B="python -m alignmamba bench --device cuda --dtype bf16 --repeats 10 --warmup 3 --batch 1 --lengths 65536"
    timeout 100 $B $M --json "$OUT/b1_64k_v11.json" 2>&1 | grep -v "^|"
    timeout 120 $B $M --cuda-graphs --json "$OUT/b1_64k_graphs_v11.json" 2>&1 | grep -v "^|"
    echo "== MOSI-sized epoch"; date
    timeout 150 python benchmarks/mosi_epoch.py --json "$OUT/mosi_epoch_v11.json" 2>&1 | tail -n 12 ;;
  esac
  date
} > "$OUT/session13_$1.txt" 2>&1
cat "$OUT/session13_$1.txt"
