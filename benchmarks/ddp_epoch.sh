#!/usr/bin/env bash
# Issue 7: epoch time of AlignMamba on MOSEI-sized synthetic data (16,326 / 1,871 / 4,659 samples,
# unaligned: text 50 x 768, audio 500 x 74, vision 500 x 35) on 1 GPU and on NGPU GPUs with DDP
# (NCCL, `alignmamba train --nproc NGPU`), and the scaling efficiency T_1 / (NGPU * T_NGPU).
#
# Run on the GPU machine from the repository root (about 6-7 minutes; every run is capped):
#   OUT=/path/to/dir bash benchmarks/ddp_epoch.sh
# Settings (environment): NGPU (2), EPOCHS (2; the last one is reported, the first carries the
# warm-up), BATCH (32 = the MOSEI preset's global batch; DDP splits it, BATCH / NGPU per GPU),
# RUN_LIMIT (seconds per training run, 170; log.csv is written after every epoch, so a capped
# run still reports the epochs it finished), WORK (/tmp/alignmamba_ddp: the 8.5 GB pickle and the
# run directories; never under $OUT, whose files come back).
# Files in $OUT: ddp_env.txt, ddp_1gpu.log, ddp_<N>gpu.log, ddp_epoch.json, ddp_epoch.md.
# "Epoch time" is log.csv's `seconds`: one pass over the training set plus the validation pass
# (both are split across the GPUs), excluding data loading and the final test evaluation.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
WORK="${WORK:-/tmp/alignmamba_ddp}"
NGPU="${NGPU:-2}"
EPOCHS="${EPOCHS:-2}"
BATCH="${BATCH:-32}"
RUN_LIMIT="${RUN_LIMIT:-170}"
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# NVLink multicast stays off (shared hosts; see the device notes), also in the torchrun workers
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
export TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}"
export NVSHMEM_DISABLE_NVLS="${NVSHMEM_DISABLE_NVLS:-1}"
T_START=$(date +%s)

{
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
    nvidia-smi -L || true
    nvidia-smi topo -m || true
    python - <<'PY'
import torch
assert torch.cuda.is_available(), "ddp_epoch.sh: no CUDA device visible"
print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", ".".join(map(str, torch.cuda.nccl.version())),
      "gpus", torch.cuda.device_count(), torch.cuda.get_device_name())
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed (the scan dispatcher falls back)")
PY
    env | grep -E '^(NCCL_NVLS_ENABLE|TORCH_SYMM_MEM_DISABLE_MULTICAST|NVSHMEM_DISABLE_NVLS)=' || true
} 2>&1 | tee "$OUT/ddp_env.txt"

DATA="$WORK/mosei_unaligned_synth.pkl"
if [ ! -f "$DATA" ]; then
    echo "== synthetic MOSEI-sized data -> $DATA"
    t0=$(date +%s)
    python -m alignmamba data synth --like mosei --out "$DATA" || { echo "data synth failed"; exit 1; }
    echo "data synth: $(( $(date +%s) - t0 )) s, $(du -h "$DATA" | cut -f1)" | tee -a "$OUT/ddp_env.txt"
fi

COMMON=(--dataset mosei --data "$DATA" --epochs "$EPOCHS" --seeds 1111 --quiet
        --set train.patience=1000 --set "data.batch_size=$BATCH")

run() {  # run NAME NPROC: one training run, capped at RUN_LIMIT seconds
    local name=$1 n=$2 rc t0
    rm -rf "$WORK/$name"
    echo "== $name: $n GPU(s), global batch $BATCH, $EPOCHS epoch(s)"
    t0=$(date +%s)
    if [ "$n" = 1 ]; then  # the plain single-process path is the baseline (no DDP wrapper)
        timeout --signal=INT --kill-after=20 "$RUN_LIMIT" \
            python -m alignmamba train --device cuda --out "$WORK/$name" "${COMMON[@]}" > "$OUT/ddp_$name.log" 2>&1
    else
        timeout --signal=INT --kill-after=20 "$RUN_LIMIT" \
            python -m alignmamba train --nproc "$n" --out "$WORK/$name" "${COMMON[@]}" > "$OUT/ddp_$name.log" 2>&1
    fi
    rc=$?
    echo "wall $(( $(date +%s) - t0 )) s, exit code $rc" | tee -a "$OUT/ddp_$name.log"
    grep -E "epoch +[0-9]+ " "$OUT/ddp_$name.log" || tail -5 "$OUT/ddp_$name.log"
}

run 1gpu 1
run "${NGPU}gpu" "$NGPU"

python - "$WORK" "$OUT" "$NGPU" "$BATCH" <<'PY'
import csv, json, sys
from pathlib import Path

work, out, ngpu, batch = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
n_train = 16326

def epochs(name):
    p = work / name / "seed_1111" / "log.csv"
    if not p.is_file():
        return []
    with open(p) as f:
        return [(int(r["epoch"]), float(r["seconds"]), float(r["train_loss"]), float(r["valid_loss"]))
                for r in csv.DictReader(f)]

res = {"n_train": n_train, "global_batch": batch, "ngpu": ngpu, "runs": {}}
for name, n in (("1gpu", 1), (f"{ngpu}gpu", ngpu)):
    rows = epochs(name)
    res["runs"][name] = {"gpus": n, "epochs": [{"epoch": e, "seconds": s, "train_loss": tl, "valid_loss": vl}
                                                for e, s, tl, vl in rows]}
    if rows:
        e, s = rows[-1][0], rows[-1][1]
        res["runs"][name].update(reported_epoch=e, epoch_seconds=s, samples_per_s=n_train / s,
                                 warm=e > 1)
t1 = res["runs"]["1gpu"].get("epoch_seconds")
tn = res["runs"][f"{ngpu}gpu"].get("epoch_seconds")
if t1 and tn:
    res["speedup"] = t1 / tn
    res["efficiency"] = t1 / (ngpu * tn)
(out / "ddp_epoch.json").write_text(json.dumps(res, indent=2) + "\n")
lines = [f"MOSEI-sized synthetic data ({n_train} training samples), global batch {batch}",
         "", "| GPUs | epoch | epoch time (s) | samples/s |", "| --- | --- | --- | --- |"]
for name, r in res["runs"].items():
    if "epoch_seconds" in r:
        lines.append(f"| {r['gpus']} | {r['reported_epoch']}{'' if r['warm'] else ' (first, with warm-up)'} "
                     f"| {r['epoch_seconds']:.2f} | {r['samples_per_s']:.0f} |")
    else:
        lines.append(f"| {r['gpus']} | - | no finished epoch (see ddp_{name}.log) | - |")
if "efficiency" in res:
    lines += ["", f"speedup {res['speedup']:.2f}x on {ngpu} GPUs, scaling efficiency "
                  f"T1 / ({ngpu} T{ngpu}) = {100 * res['efficiency']:.0f}%"]
text = "\n".join(lines) + "\n"
(out / "ddp_epoch.md").write_text(text)
print(text)
PY
echo "total $(( $(date +%s) - T_START )) s; results in $OUT"
