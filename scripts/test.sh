#!/usr/bin/env bash
# README command 2: install what the tests need, then run them (CPU, offline).
# Usage:
#   bash scripts/test.sh                     # the fast tests: every test but the 27 marked slow
#                                            # (391 tests; 389 of them: 230–275 s on 2 cores at a load average of about 1)
#   bash scripts/test.sh --all               # CI mode (.ci/run): every test, also the slow end-to-end runs (toy-world
#                                            # and student builds, the quickstart, the benches, multi-process, kill
#                                            # and training runs; see the README for their times); the world build and
#                                            # the quickstart print their progress as they go
#   bash scripts/test.sh [--all] ARGS        # other arguments go to pytest, e.g. -x, -k sweep, tests/test_cli.py
#   SKIP_INSTALL=1 bash scripts/test.sh ...  # skip the install step (idempotent: seconds when done)
#   CPU_ONLY=1 bash scripts/test.sh          # install torch as CPU-only wheels first (see scripts/install.sh --help)
#   bash scripts/test.sh --help              # this text; runs nothing
# The install (scripts/install.sh --tests) adds, beside requirements.txt and the project itself, the reference
# HPSv2 code that one test compares against. Every test and the processes it starts use one CPU thread
# (OMP_NUM_THREADS=1), so the times do not collapse when other jobs keep the cores busy.
source "$(dirname "${BASH_SOURCE[0]}")/usage.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
SELECT=(-m "not slow")
ARGS=()
for arg in "$@"; do
  if [ "$arg" = "--all" ]; then SELECT=(); else ARGS+=("$arg"); fi
done
if [ -z "${SKIP_INSTALL:-}" ]; then
  PYTHON="$PY" bash scripts/install.sh --tests
fi
# --durations: the slowest tests are listed at the end (what to mark slow when the fast mode grows)
exec "$PY" -m pytest -q --durations=15 ${SELECT[@]+"${SELECT[@]}"} ${ARGS[@]+"${ARGS[@]}"}
