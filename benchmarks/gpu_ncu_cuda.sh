#!/usr/bin/env bash
# Nsight Compute on a CUDA scan kernel: stall reasons, stall samples per SASS line.
#   OUT=/path bash benchmarks/gpu_ncu_cuda.sh fwd|bwd [args of ncu_fwd.py] (runs here: --length 2048)
# fwd: the forward (KERNEL_NOTES v10; its inference launch), bwd: the backward (the default
# version, cuda_scan.BWD_VERSION: v11 ssm_bwd4; the regex also matches v9 ssm_bwd).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
P="$1"; shift
R=/tmp/ncu_$P
if [ "$P" = bwd ]; then ARGS=(--backward cuda); else ARGS=(--kernel cuda); fi
timeout 400 ncu -k regex:ssm_$P --launch-skip 1 --launch-count 1 \
  --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
  --section LaunchStats --section SourceCounters --section MemoryWorkloadAnalysis \
  --section ComputeWorkloadAnalysis --section InstructionStats \
  -f -o $R python benchmarks/ncu_fwd.py "${ARGS[@]}" "$@" > "$OUT/ncu_${P}_run.txt" 2>&1
ncu -i $R.ncu-rep --print-summary none > "$OUT/ncu_${P}_details.txt" 2>&1
ncu -i $R.ncu-rep --page source --csv --print-source sass > "$OUT/ncu_${P}_sass.csv" 2>&1
python benchmarks/ncu_summary.py "$OUT/ncu_${P}_sass.csv" > "$OUT/ncu_${P}_sass_summary.txt" 2>&1
tail -n 3 "$OUT/ncu_${P}_run.txt"
grep -E "Duration|Stall|Warp Cycles|Issued Ipc|Achieved Occupancy|Eligible|No Eligible|Registers|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth|Compute \(SM\)|Memory Throughput|Active Warps|Executed Instructions|Shared Memory|Bank" "$OUT/ncu_${P}_details.txt" | head -n 60
head -n 40 "$OUT/ncu_${P}_sass_summary.txt"
