#!/usr/bin/env bash
# Install what golden-noise-rnn needs into the current Python environment (quickstart.sh and test.sh run it first).
# Usage:
#   bash scripts/install.sh               # requirements.txt, then the project itself (pip install -e .)
#   CPU_ONLY=1 bash scripts/install.sh    # first torch + torchvision as CPU-only wheels from PyTorch's index, then
#                                         # the same: for machines without a GPU (PyPI's Linux torch pulls ~3 GB of
#                                         # CUDA libraries, which a CPU machine never uses)
#   bash scripts/install.sh --tests       # also the reference HPSv2 code that one test compares against
#                                         # (requirements-reference.txt, with --no-deps: its own pins would break
#                                         # the rest)
#   bash scripts/install.sh --help        # this text; installs nothing
# Environment: PYTHON (the interpreter to install into; default: python on PATH); CPU_ONLY=1; TORCH_INDEX_URL (the
# index torch and torchvision come from first: https://download.pytorch.org/whl/cpu with CPU_ONLY=1; set it to
# pick another build, e.g. https://download.pytorch.org/whl/cu126, or a local mirror). The torch and torchvision
# versions are those requirements.txt allows. Without CPU_ONLY and TORCH_INDEX_URL nothing changes for GPU users:
# pip installs torch from PyPI as requirements.txt says (or keeps the build already installed).
source "$(dirname "${BASH_SOURCE[0]}")/usage.sh"
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-$(command -v python || command -v python3)}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
TESTS=""
for arg in "$@"; do
  case "$arg" in
    --tests) TESTS=1 ;;
    *) echo "error: unknown argument '$arg' (see: bash scripts/install.sh --help)" >&2; exit 2 ;;
  esac
done
INDEX="${TORCH_INDEX_URL:-}"
if [ -n "${CPU_ONLY:-}" ] && [ "${CPU_ONLY}" != "0" ]; then
  INDEX="${INDEX:-https://download.pytorch.org/whl/cpu}"
fi

if [ -n "$INDEX" ]; then
  # torch and torchvision with requirements.txt's version ranges (one home for them), from $INDEX only
  mapfile -t TORCH < <(sed -n 's/#.*//; s/[[:space:]]//g; /^torch\(vision\)\{0,1\}[<>=!~]/p' requirements.txt)
  echo "installing ${TORCH[*]} from $INDEX"
  "$PY" -m pip install -q --index-url "$INDEX" "${TORCH[@]}"
fi
"$PY" -m pip install -q -r requirements.txt
if [ -n "$TESTS" ]; then
  "$PY" -m pip install -q --no-deps -r requirements-reference.txt
fi
"$PY" -m pip install -q --no-deps -e .
