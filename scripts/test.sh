#!/usr/bin/env bash
# README command 2: install what the tests need, then run them (CPU, offline).
#   bash scripts/test.sh                    # the whole suite, slow end-to-end tests included
#   bash scripts/test.sh -m "not slow"      # the fast subset; any other pytest arguments pass through
#   SKIP_INSTALL=1 bash scripts/test.sh ... # skip the (idempotent, seconds when done) install step
# The install adds, beside requirements.txt and the project itself, the reference HPSv2 code that one test
# compares against (requirements-reference.txt, installed with --no-deps: its own pins would break the rest).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
if [ -z "${SKIP_INSTALL:-}" ]; then
  "$PY" -m pip install -q -r requirements.txt
  "$PY" -m pip install -q --no-deps -r requirements-reference.txt
  "$PY" -m pip install -q --no-deps -e .
fi
exec "$PY" -m pytest -q "$@"
