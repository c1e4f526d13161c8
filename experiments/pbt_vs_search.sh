#!/usr/bin/env bash
# PBT against random search and TPE at equal proxy compute, then each one's result on the target
# (#21 point 6). CPU: the d=64 proxy (configs/proxy-cpu.yaml) and the d=256 target
# (configs/target-cpu.yaml); 8 × 200 proxy steps per method. About 1.5 h on 2 cores.
#   bash experiments/pbt_vs_search.sh [search|pbt|target|all]   (default all; each part resumes)
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
MUPFAST=${MUPFAST:-.venv/bin/mupfast}
OUT=${OUT:-runs/pbt-vs-search}
SPACE=configs/pbt-space.yaml          # the sweep's space without init_std (PBT cannot change it mid-run)
N=${N:-8} STEPS=${STEPS:-200} INTERVAL=${INTERVAL:-25} SEED=${SEED:-2026}
PROXY=(--config configs/proxy-cpu.yaml train.steps="$STEPS")
part=${1:-all}
mkdir -p "$OUT"

if [[ $part == search || $part == all ]]; then
  # Random and TPE side by side, one thread each; TPE models the results after 3 random trials
  # (Optuna's default of 10 would make an 8-trial TPE study random search).
  for sampler in random tpe; do
    "$MUPFAST" sweep "${PROXY[@]}" --study "pbt-cpu-$sampler" --storage "sqlite:///$OUT/$sampler.db" \
      --sweep-dir "$OUT/$sampler" --trials "$N" --sampler "$sampler" --startup-trials 3 --pruner none \
      --space "$SPACE" --seed "$SEED" --threads 1 > "$OUT/$sampler.log" 2>&1 &
  done
  wait
fi
if [[ $part == pbt || $part == all ]]; then
  "$MUPFAST" pbt "${PROXY[@]}" --study pbt-cpu --storage "sqlite:///$OUT/pbt.db" --population "$N" \
    --interval "$INTERVAL" --steps "$STEPS" --space "$SPACE" --seed "$SEED" --pbt-dir "$OUT/pbt" \
    --jobs 2 --threads 1 > "$OUT/pbt.log" 2>&1
fi
if [[ $part == target || $part == all ]]; then
  # Each method's best, carried to the 4× wider target by μP's rules and trained there.
  for method in random tpe; do
    "$MUPFAST" transfer --study "pbt-cpu-$method" --storage "sqlite:///$OUT/$method.db" \
      --target configs/target-cpu.yaml --top-k 1 --out "$OUT/target-$method"
  done
  "$MUPFAST" transfer --pbt pbt-cpu --storage "sqlite:///$OUT/pbt.db" --target configs/target-cpu.yaml \
    --out "$OUT/target-pbt/target.yaml"
  for cfg in "$OUT"/target-*/*.yaml; do
    "$MUPFAST" train --config "$cfg" train.run_dir="${cfg%.yaml}-run" train.progress=false \
      train.save_final=false | tee -a "$OUT/targets.log"
  done
  # The ablation: PBT's values without its lr schedule (constant multiplier 1 over the proxy's shape).
  "$MUPFAST" train --config "$OUT/target-pbt/target.yaml" schedule.piecewise=[] \
    train.run_dir="$OUT/target-pbt-nopiecewise/run" train.progress=false train.save_final=false \
    | tee -a "$OUT/targets.log"
fi
# Seeds: SEED=2027 OUT=runs/pbt-vs-search/seed2027 bash experiments/pbt_vs_search.sh; then the table,
# JSON and picture over all of them: python -m experiments.pbt_vs_search_report
