#!/usr/bin/env bash
# The ablation table (issue 5) and the missing-modality curves (issue 4) on the synthetic default,
# run on one GPU in one device call: variant groups train as parallel processes, then the
# runner is called once more with --resume to gather every variant into one table.
#   OUT=/path SEEDS="1111 1112" EPOCHS=20 bash benchmarks/gpu_ablation.sh
# Measured 2026-11-27: with SEEDS="1111 1112" EPOCHS=16 it did not finish within a 560 s limit on
# one H100 (nothing came back); give each call fewer variants or one seed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
WORK="${WORK:-/tmp/alignmamba_ablation}"; mkdir -p "$WORK"
SEEDS="${SEEDS:-1111 1112}"; EPOCHS="${EPOCHS:-20}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
ABL=(python -m alignmamba ablate --device cuda --seeds $SEEDS --epochs "$EPOCHS" --out "$WORK/abl" --quiet)
for group in "alignmamba no_ot" "no_mmd no_ot_no_mmd" "sinkhorn order_aware" "transformer_single mamba_single" \
             "transformer_multi mamba_multi"; do
  "${ABL[@]}" --variants $group > "$WORK/abl_${group// /_}.log" 2>&1 &
done
# incomplete setting: one model trained with whole modalities dropped (rate drawn per batch)
python -m alignmamba train --device cuda --seeds $SEEDS --epochs "$EPOCHS" --quiet --out "$WORK/imder" \
    --missing-protocol imder --missing-rate -1 > "$WORK/imder.log" 2>&1 &
wait
"${ABL[@]}" --resume > "$WORK/abl_all.log" 2>&1; tail -n 20 "$WORK/abl_all.log"
cp "$WORK/abl/ablation.md" "$WORK/abl/ablation.json" "$OUT/" 2>/dev/null
RATES=0.1,0.2,0.3,0.4,0.5,0.6,0.7
for m in complete imder; do
  ck="$WORK/abl/alignmamba/seed_1111/best"; [ "$m" = imder ] && ck="$WORK/imder/seed_1111/best"
  python -m alignmamba evaluate --device cuda --checkpoint "$ck" --missing-rates $RATES --missing-protocol imder \
      --json "$OUT/missing_$m.json" > "$WORK/eval_$m.log" 2>&1; tail -n 12 "$WORK/eval_$m.log"
done
ls "$WORK/abl"; for f in "$WORK"/abl_*.log "$WORK/imder.log"; do echo "== $f"; tail -n 3 "$f"; done
