#!/usr/bin/env bash
# Nsight Compute on the CUDA backward (KERNEL_NOTES v9): stall reasons, stall samples per SASS line.
#   OUT=/path bash benchmarks/gpu_ncu_bwd.sh [args of ncu_fwd.py] (runs here: --length 2048)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
R=/tmp/ncu_bwd
timeout 400 ncu -k regex:ssm_bwd --launch-skip 1 --launch-count 1 \
  --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
  --section LaunchStats --section SourceCounters --section MemoryWorkloadAnalysis \
  --section ComputeWorkloadAnalysis --section InstructionStats \
  -f -o $R python benchmarks/ncu_fwd.py --backward cuda "$@" > "$OUT/ncu_bwd_run.txt" 2>&1
ncu -i $R.ncu-rep --print-summary none > "$OUT/ncu_bwd_details.txt" 2>&1
ncu -i $R.ncu-rep --page source --csv --print-source sass > "$OUT/ncu_bwd_sass.csv" 2>&1
tail -n 3 "$OUT/ncu_bwd_run.txt"
grep -E "Duration|Stall|Warp Cycles|Issued Ipc|Achieved Occupancy|Eligible|No Eligible|Registers|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth|Compute \(SM\)|Memory Throughput|Active Warps|Executed Instructions|Shared Memory|Bank" "$OUT/ncu_bwd_details.txt" | head -n 60
