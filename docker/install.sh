#!/usr/bin/env bash
# Install medseg inside the image (also runnable outside Docker, which is how CI tests it).
#   install.sh [TORCH_SPEC] [TORCH_INDEX]
# With no TORCH_SPEC, the torch already installed (the CUDA base image's) is pinned by a generated
# constraint so that resolving medseg's `torch>=2.2,<3` never replaces it.
set -euo pipefail
TORCH_SPEC="${1:-}"
TORCH_INDEX="${2:-}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
CONSTRAINT="$(mktemp)"
trap 'rm -f "$CONSTRAINT"' EXIT

if [[ -n "$TORCH_SPEC" ]]; then
    if [[ -n "$TORCH_INDEX" ]]; then
        "$PY" -m pip install --extra-index-url "$TORCH_INDEX" "$TORCH_SPEC"
    else
        "$PY" -m pip install "$TORCH_SPEC"
    fi
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "install.sh: no torch in this environment; pass TORCH_SPEC (e.g. torch==2.5.1) or use a PyTorch base image" >&2
    exit 1
fi
"$PY" -c "import torch; print('torch==' + torch.__version__)" > "$CONSTRAINT"
echo "install.sh: keeping $(cat "$CONSTRAINT")"
"$PY" -m pip install -c "$CONSTRAINT" "$HERE"
medseg --version
