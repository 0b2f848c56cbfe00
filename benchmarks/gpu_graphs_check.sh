#!/usr/bin/env bash
# Issue 6 on the GPU: the CUDA-graph tests, then the MOSI-sized epoch benchmark
# (benchmarks/mosi_epoch.py: eager torch scan / eager Triton scan / CUDA graphs).
# Run from anywhere; writes 3 files to $OUT (default benchmarks/results):
#   graphs_tests.txt   environment + pytest tests/test_graphs.py (the CUDA tests run here)
#   mosi_epoch.txt     the benchmark's table (and stderr)
#   mosi_epoch.json    per-epoch seconds, medians, ratios vs the eager torch-scan path, versions
#   OUT=/path bash benchmarks/gpu_graphs_check.sh
# A failing step does not stop the next one; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
    python -c "import triton; print('triton', triton.__version__)" || echo "triton not importable"
    echo "== pytest tests/test_graphs.py"
    timeout 240 python -m pytest -q -rs -p no:cacheprovider tests/test_graphs.py
} > "$OUT/graphs_tests.txt" 2>&1 || { status=1; echo "!! tests failed (see graphs_tests.txt)"; }
tail -n 5 "$OUT/graphs_tests.txt"
echo "== MOSI-sized epoch benchmark"
timeout 300 python benchmarks/mosi_epoch.py --json "$OUT/mosi_epoch.json" > "$OUT/mosi_epoch.txt" 2>&1 \
    || { status=1; echo "!! benchmark failed (see mosi_epoch.txt)"; }
cat "$OUT/mosi_epoch.txt"
exit $status
