#!/usr/bin/env bash
# One device call for the GPU figures of BENCHMARKS.md (issues 5 and 6), each step time-boxed.
#   OUT=/path bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
COMMON=(--device cuda --mode inference --dtype bf16 --d-model 256 --layers 4 --repeats 10 --warmup 3)
echo "== run_gpu.sh (batch 32 to 6.4k, batch 1 to 64k; fused scan)"
TORCH_SCAN=0 timeout 260 bash benchmarks/run_gpu.sh
echo "== batch 1, pure-PyTorch scan (before the fused kernel)"
timeout 80 python -m alignmamba bench "${COMMON[@]}" --batch 1 --lengths 1600,6400,25600,65536 \
    --models alignmamba mamba_single --scan-backend torch --json "$OUT/gpu_b1_torch_scan.json" | tee "$OUT/gpu_b1_torch_scan.md"
echo "== very long inputs: AlignMamba at 128k and 256k total tokens"
timeout 80 python -m alignmamba bench "${COMMON[@]}" --batch 1 --lengths 131072,262144 \
    --models alignmamba transformer_single --json "$OUT/gpu_long.json" | tee "$OUT/gpu_long.md"
echo "== MOSI-sized training epochs (1,284 samples, batch 32, unaligned shapes): fused scan vs pure PyTorch"
for be in auto torch; do
  timeout 70 python -m alignmamba train --device cuda --epochs 3 --quiet --out "/tmp/ep_$be" \
      --set model.scan_backend=$be --set train.patience=100 > "$OUT/train_$be.log" 2>&1
  echo "backend $be: epoch seconds $(cut -d, -f1- /tmp/ep_$be/seed_1111/log.csv | awk -F, 'NR==1{for(i=1;i<=NF;i++) if($i=="seconds") c=i} NR>1{printf "%s ", $c}')"
done | tee "$OUT/train_epochs.txt"
