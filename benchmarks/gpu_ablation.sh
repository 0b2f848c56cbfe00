#!/usr/bin/env bash
# The ablation table (issue 5) on the synthetic default, on whatever GPUs are visible:
# every (variant, seed) run as a worker process, 15 at a time (small models leave a GPU mostly
# idle, so several per GPU raise throughput), then one table. Rerun with the same OUT to resume.
#   OUT=/path WORK=/tmp/abl bash benchmarks/gpu_ablation.sh
# Measured 2026-11-27: 13 of the 30 runs in 390 s on one H100, the other 17 in 380 s on 2 x H200
# (docs/ablation_synthetic.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"; WORK="${WORK:-/tmp/alignmamba_ablation}"; mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python -m alignmamba ablate --device cuda --jobs "${JOBS:-15}" --out "$WORK" --quiet --resume
cp "$WORK/ablation.md" "$WORK/ablation.json" "$OUT/" 2>/dev/null
