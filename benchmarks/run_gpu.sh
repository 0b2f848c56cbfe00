#!/usr/bin/env bash
# The GPU efficiency benchmark of issue 5 (the paper's 6.4k-token comparison, SPEC section 4).
# Run on the GPU machine from the repository root; results go to $OUT (default benchmarks/results):
#   OUT=/path/to/dir bash benchmarks/run_gpu.sh
# All models share d_model 256, 4 layers (the paper gives neither), inference, bf16 autocast.
#   1. batch 32 at 800..6400 tokens (the paper's point is 6.4k)         -> gpu_b32.{json,png,md}
#   2. batch 1 from 800 up to 65536 tokens                              -> gpu_b1.{json,png,md}
#   3. as 2 for the Mamba models with the pure-PyTorch scan forced
#      (the "before the fused scan" figures; skip with TORCH_SCAN=0)   -> gpu_b1_torch_scan.{json,png,md}
# Each command prints its Markdown table; points that run out of memory are recorded as "oom".
# A step that fails (a bug, not an OOM) is reported and the next step still runs; the script
# then exits non-zero.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY' | tee "$OUT/gpu_env.txt" || exit 1
import torch
assert torch.cuda.is_available(), "run_gpu.sh: no CUDA device visible"
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed (the scan dispatcher falls back)")
PY
date -u +"date %Y-%m-%dT%H:%M:%SZ" | tee -a "$OUT/gpu_env.txt"

plot() {  # --plot only where matplotlib is installed (the JSON holds every figure anyway)
    if python -c "import matplotlib" 2>/dev/null; then echo --plot "$1"; fi
}
COMMON=(--device cuda --mode inference --dtype bf16 --d-model 256 --layers 4 --repeats 10 --warmup 3)

status=0
echo "== 1. batch 32, up to 6400 tokens"
python -m alignmamba bench "${COMMON[@]}" --batch 32 --lengths 800,1600,3200,6400 \
    --json "$OUT/gpu_b32.json" $(plot "$OUT/gpu_b32.png") 2>&1 | tee "$OUT/gpu_b32.md" \
    || { status=1; echo "!! step 1 failed"; }

echo "== 2. batch 1, up to 65536 tokens"
python -m alignmamba bench "${COMMON[@]}" --batch 1 --lengths 800,1600,3200,6400,12800,25600,65536 \
    --json "$OUT/gpu_b1.json" $(plot "$OUT/gpu_b1.png") 2>&1 | tee "$OUT/gpu_b1.md" \
    || { status=1; echo "!! step 2 failed"; }

if [ "${TORCH_SCAN:-1}" != "0" ]; then
    echo "== 3. batch 1, Mamba models with the pure-PyTorch scan (no fused kernel)"
    python -m alignmamba bench "${COMMON[@]}" --batch 1 --lengths 800,1600,3200,6400,12800,25600,65536 \
        --models alignmamba mamba_single mamba_multi --scan-backend torch \
        --json "$OUT/gpu_b1_torch_scan.json" $(plot "$OUT/gpu_b1_torch_scan.png") 2>&1 \
        | tee "$OUT/gpu_b1_torch_scan.md" || { status=1; echo "!! step 3 failed"; }
fi
echo "results in $OUT"
exit $status
