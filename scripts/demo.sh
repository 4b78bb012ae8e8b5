#!/usr/bin/env bash
# `make demo`: the whole medseg pipeline on the built-in synthetic data set, on CPU, in a few minutes.
#   scripts/demo.sh [MEDSEG] [OUT_DIR]
# synthetic data -> check -> plan -> 2-fold patient-wise crossval -> predict new cases -> evaluate -> report
set -euo pipefail
MEDSEG="${1:-medseg}"
OUT="${2:-demo_out}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

step() { printf '\n== %s\n' "$*"; }

# the demo is a fresh showcase each time: remove what an earlier demo wrote (only its own subfolders)
rm -rf "$OUT/run" "$OUT/predictions" "$OUT/evaluation" "$OUT/new" "$OUT/report.html" "$OUT/plan.json"

step "1/8 synthetic training data (MSD layout, oblique anisotropic geometry) -> $OUT/data"
"$MEDSEG" demo-data "$OUT/data" --cases 12 --seed 0 --force
step "2/8 check the data set"
"$MEDSEG" check-dataset "$OUT/data"
step "3/8 one image's geometry"
"$MEDSEG" info "$OUT/data/imagesTr/$(ls "$OUT/data/imagesTr" | head -n 1)"
step "4/8 plan from the dataset fingerprint"
"$MEDSEG" plan "$OUT/data" -o "$OUT/plan.json"
step "5/8 2-fold patient-wise cross-validation (tiny network, CPU)"
"$MEDSEG" crossval --config "$ROOT/pipelines/demo.yaml" --dataset "$OUT/data" --output "$OUT/run" --no-progress
step "6/8 predict new cases (a second synthetic set) with the 2-fold ensemble"
"$MEDSEG" demo-data "$OUT/new" --cases 4 --seed 1 --force
"$MEDSEG" predict -i "$OUT/new/imagesTr" -o "$OUT/predictions" -m "$OUT/run" --overwrite
step "7/8 evaluate against the new cases' labels"
"$MEDSEG" evaluate --pred "$OUT/predictions" --ref "$OUT/new/labelsTr" -o "$OUT/evaluation"
step "8/8 HTML report"
"$MEDSEG" report "$OUT/predictions" --ref "$OUT/new/labelsTr" --images "$OUT/new/imagesTr" -o "$OUT/report.html"
printf '\nDone. Masks: %s/predictions  metrics: %s/evaluation  report: %s/report.html  run folder: %s/run\n' \
    "$OUT" "$OUT" "$OUT" "$OUT"
