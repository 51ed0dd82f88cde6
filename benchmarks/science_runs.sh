#!/usr/bin/env bash
# The runs behind docs/science.md: table-size sweeps on three corpora (memory scaling and the
# table-size rule), placement and variants on the default corpus. Loss curves depend on (seed,
# step) only, so these may run beside other work; the seconds-per-step figures are noisier then.
# Usage: bash benchmarks/science_runs.sh [sizes|placement|variants|allocation|three-seeds|all] [OUTDIR]
set -euo pipefail
WHAT=${1:-all}
OUT=${2:-benchmarks/results/science}
D=${ENGRAM_DATA:-../shared/data}
COMMON=(--steps 150 --seeds 0,1 --no-progress --threads 1)
mkdir -p "$OUT"
if [[ $WHAT == sizes || $WHAT == all ]]; then
  SIZES=1250,5000,20000,80000
  engram sweep --axis table-size --values $SIZES "${COMMON[@]}" --out "$OUT/sizes-stdlib"
  engram sweep --axis table-size --values $SIZES "${COMMON[@]}" --data "$D/tinyshakespeare.txt" --out "$OUT/sizes-shakespeare"
  engram sweep --axis table-size --values $SIZES "${COMMON[@]}" --data "$D/wikitext-2/valid.txt" \
    --eval-data "$D/wikitext-2/test.txt" --out "$OUT/sizes-wikitext2"
fi
if [[ $WHAT == placement || $WHAT == all ]]; then
  engram sweep --axis engram-layers --values 0,1,2,3 "${COMMON[@]}" --out "$OUT/placement-stdlib"
fi
if [[ $WHAT == variants || $WHAT == all ]]; then
  engram sweep --axis variant --values engram,lite,noconv,nogate "${COMMON[@]}" --out "$OUT/variants-stdlib"
fi
if [[ $WHAT == allocation || $WHAT == all ]]; then  # 3 seeds, 120 steps (the study's default budget)
  A=(--seeds 0,1,2 --no-progress --threads 1 --data "$D/tinyshakespeare.txt")
  engram sweep --axis allocation --values 0.1,0.2,0.3,0.5 "${A[@]}" --out "$OUT/allocation-shakespeare"
  engram sweep --axis allocation --values 0.05,0.7 "${A[@]}" --out "$OUT/allocation-shakespeare-2"
fi
if [[ $WHAT == three-seeds || $WHAT == all ]]; then  # the 3-seed reruns docs/science.md reports
  T=(--steps 150 --seeds 0,1,2 --no-progress --threads 1)
  engram sweep --axis table-size --values 1250,5000,20000,80000 "${T[@]}" --data "$D/tinyshakespeare.txt" \
    --out "$OUT/sizes-shakespeare-3seeds"
  engram sweep --axis table-size --values 1250,5000,20000,80000 "${T[@]}" --data "$D/wikitext-2/valid.txt" \
    --eval-data "$D/wikitext-2/test.txt" --out "$OUT/sizes-wikitext2-3seeds"
  engram sweep --axis engram-layers --values 0,1,2,3 "${T[@]}" --out "$OUT/placement-stdlib-3seeds"
  engram sweep --axis variant --values engram,lite,noconv,nogate "${T[@]}" --out "$OUT/variants-stdlib-3seeds"
fi
