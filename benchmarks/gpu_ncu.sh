#!/usr/bin/env bash
# Nsight Compute on the forward scan: warp stall reasons and the stall samples per SASS line.
#   OUT=/path bash benchmarks/gpu_ncu.sh [args of ncu_fwd.py]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
R=/tmp/ncu_fwd
# launches 2 and 4 of the kernel: the timed (second) call without / with checkpoints
timeout 300 ncu -k regex:_ssm_fwd_kernel --launch-skip 1 --launch-count 3 \
  --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
  --section LaunchStats --section SourceCounters --section MemoryWorkloadAnalysis \
  -f -o $R python benchmarks/ncu_fwd.py "$@" > "$OUT/ncu_run.txt" 2>&1
ncu -i $R.ncu-rep --print-summary none > "$OUT/ncu_details.txt" 2>&1
ncu -i $R.ncu-rep --page source --csv --print-source sass > "$OUT/ncu_sass.csv" 2>&1
ls -la "$OUT"; tail -n 5 "$OUT/ncu_run.txt"
grep -E "^  _ssm|Duration|Stall|Warp Cycles|Issued Ipc|Achieved Occupancy|Eligible|No Eligible|Registers|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth|Compute \(SM\)|Memory Throughput|Active Warps" "$OUT/ncu_details.txt" | head -n 80
