#!/usr/bin/env bash
# Smoke test of an installed medseg (run inside the image as a build step, or on any machine):
# synthetic demo data -> tiny 2-fold crossval -> predict -> evaluate.
set -euo pipefail
WORK="${1:-$(mktemp -d)}"
CONFIG="${MEDSEG_SMOKE_CONFIG:-$(cd "$(dirname "$0")/.." && pwd)/pipelines/demo.yaml}"
medseg demo-data "$WORK/data" --cases 8
medseg check-dataset "$WORK/data"
medseg crossval --config "$CONFIG" --dataset "$WORK/data" --output "$WORK/run" --epochs 2
medseg predict -i "$WORK/data/imagesTr" -o "$WORK/pred" -m "$WORK/run"
medseg evaluate --pred "$WORK/pred" --ref "$WORK/data/labelsTr" --output "$WORK/eval"
echo "smoke test passed: $WORK"
