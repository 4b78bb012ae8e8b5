#!/usr/bin/env bash
# Smoke test of an installed medseg, inside the image (a RUN step of docker/Containerfile.smoke) or anywhere:
# synthetic demo data -> tiny 2-fold crossval -> predict -> evaluate, on the CPU unless told otherwise.
#   smoke.sh [WORK_DIR]        (default: a new temporary folder)
# Environment: MEDSEG_SMOKE_CONFIG (pipeline YAML, default docker/smoke.yaml beside this script),
# MEDSEG_SMOKE_EPOCHS (default 1), MEDSEG_SMOKE_DEVICE (auto, cpu or cuda; default cpu).
set -euo pipefail
WORK="${1:-$(mktemp -d)}"
CONFIG="${MEDSEG_SMOKE_CONFIG:-$(cd "$(dirname "$0")" && pwd)/smoke.yaml}"
EPOCHS="${MEDSEG_SMOKE_EPOCHS:-1}"
DEVICE="${MEDSEG_SMOKE_DEVICE:-cpu}"

medseg --version
medseg demo-data "$WORK/data" --cases 8 --seed 0
medseg check-dataset "$WORK/data"
medseg crossval --config "$CONFIG" --dataset "$WORK/data" --output "$WORK/run" \
    --epochs "$EPOCHS" --device "$DEVICE" --no-progress
medseg predict -i "$WORK/data/imagesTr" -o "$WORK/pred" -m "$WORK/run" --device "$DEVICE" --no-tta
medseg evaluate --pred "$WORK/pred" --ref "$WORK/data/labelsTr" --out "$WORK/eval" --bootstrap 100

for f in run/model.json run/plan.json run/splits.json run/crossval_summary.json eval/per_case.csv eval/summary.json; do
    if [[ ! -s "$WORK/$f" ]]; then
        echo "smoke test FAILED: $WORK/$f was not written" >&2
        exit 1
    fi
done
n_images=$(find "$WORK/data/imagesTr" -name '*.nii.gz' | wc -l)
n_pred=$(find "$WORK/pred" -maxdepth 1 -name '*.nii.gz' | wc -l)
if [[ "$n_pred" -ne "$n_images" ]]; then
    echo "smoke test FAILED: $n_pred predictions for $n_images images in $WORK/pred" >&2
    exit 1
fi
echo "smoke test passed: $WORK ($n_pred cases predicted and evaluated)"
