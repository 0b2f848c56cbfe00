#!/usr/bin/env bash
# Fifth session, final GPU runs (CUDA forward and seeds pass, KERNEL_NOTES v10, as defaults):
#   OUT=/path bash benchmarks/gpu_session12.sh tests   # compiled kernel/model tests
#   OUT=/path bash benchmarks/gpu_session12.sh bench   # issue-6 shape (Triton kernels and the
#       PyTorch path in the same run), batch 1 x D 512 x 64k, AlignMamba at 64k tokens
#       (eager and CUDA-graphed, vs both Transformers), the MOSI-sized epoch
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date
  if [ "$1" = tests ]; then
    timeout 520 python -m pytest -p no:cacheprovider -p no:warnings tests/test_triton_scan.py tests/test_ssm.py tests/test_graphs.py tests/test_nvrtc.py 2>&1 | tail -n 8
  else
    echo "== issue-6 shape"; date
    timeout 200 python benchmarks/bench_scan.py --reps 10 --fwd-segs 0 --fwd-opts "" GS=8 MINB=2,GS=8 MINB=4 "" --bwd-segs 0 1 --json "$OUT/scan_v10_final.json"
    echo "== batch 1, D 512, L 65536"; date
    timeout 60 python benchmarks/bench_scan.py --batch 1 --dim 512 --length 65536 --reps 10 --no-torch --fwd-segs 0 16 --bwd-segs 0 --json "$OUT/scan_v10_final_b1.json"
    echo "== AlignMamba at 64k tokens, batch 1"; date
    M="--models alignmamba transformer_single transformer_multi"
    B="python -m alignmamba bench --device cuda --dtype bf16 --repeats 10 --warmup 3 --batch 1 --lengths 65536"
    timeout 100 $B $M --json "$OUT/b1_64k_final.json" 2>&1 | grep -v "^|"
    timeout 120 $B $M --cuda-graphs --json "$OUT/b1_64k_graphs_final.json" 2>&1 | grep -v "^|"
    echo "== MOSI-sized epoch"; date
    timeout 150 python benchmarks/mosi_epoch.py --json "$OUT/mosi_epoch_v10_final.json" 2>&1 | tail -n 12
  fi
  date
} > "$OUT/session12_$1.txt" 2>&1
cat "$OUT/session12_$1.txt"
