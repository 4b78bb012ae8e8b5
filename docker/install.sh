#!/usr/bin/env bash
# Install medseg with its pinned dependencies into the current Python environment. The image runs it in its
# venv; it runs the same anywhere else (tests/test_docker.py runs it in a throwaway venv).
#   install.sh [TORCH_SPEC] [TORCH_INDEX]
#   TORCH_SPEC   empty: keep the torch already installed (the CUDA base image's) and pin it, so that resolving
#                medseg's `torch>=2.2,<3` never replaces it; else a requirement such as torch==2.13.0.
#   TORCH_INDEX  extra index URL for TORCH_SPEC, e.g. https://download.pytorch.org/whl/cpu (empty: pip's own).
# Environment: PYTHON (default python3), MEDSEG_EXTRAS (default "tensorboard"), MEDSEG_PIP_ARGS (extra pip
# arguments, e.g. --no-build-isolation). pip reads its indexes from its usual config and PIP_* variables.
set -euo pipefail
TORCH_SPEC="${1:-}"
TORCH_INDEX="${2:-}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
EXTRAS="${MEDSEG_EXTRAS-tensorboard}"
read -r -a PIP_ARGS <<< "${MEDSEG_PIP_ARGS:-}"
PINS="$HERE/docker/constraints.txt"
TORCH_PIN="$(mktemp)"
trap 'rm -f "$TORCH_PIN"' EXIT

if [[ ! -f "$PINS" ]]; then
    echo "install.sh: $PINS is missing; expected the pinned dependency versions next to this script" >&2
    exit 1
fi
if [[ -n "$TORCH_SPEC" ]]; then
    if [[ -n "$TORCH_INDEX" ]]; then
        "$PY" -m pip install "${PIP_ARGS[@]}" --extra-index-url "$TORCH_INDEX" "$TORCH_SPEC"
    else
        "$PY" -m pip install "${PIP_ARGS[@]}" "$TORCH_SPEC"
    fi
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "install.sh: no torch importable by $PY; pass TORCH_SPEC (e.g. torch==2.13.0) or use a PyTorch base image" >&2
    exit 1
fi
# torch.__version__ carries the local build tag (2.5.1+cu124, 2.13.0+cpu): pin exactly that build.
"$PY" -c "import torch; print('torch==' + torch.__version__)" > "$TORCH_PIN"
echo "install.sh: keeping $(cat "$TORCH_PIN") ($("$PY" -c "import torch; print('CUDA ' + str(torch.version.cuda) if torch.version.cuda else 'CPU-only')"))"

TARGET="$HERE"
if [[ -n "$EXTRAS" ]]; then
    TARGET="$HERE[$EXTRAS]"
fi
"$PY" -m pip install "${PIP_ARGS[@]}" -c "$TORCH_PIN" -c "$PINS" "$TARGET"

# The entrypoint must be the console script of this environment, and it must run.
BIN="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")"
"$BIN/medseg" --version
