#!/usr/bin/env bash
# Stage 6: score the images written by batch inference and compare golden noise with standard noise.
# (The original project's spelling, scripts/evalute.sh, runs this script.)
# Usage:
#   bash scripts/evaluate.sh                              # HPSv2 v2.1 on ./inference_output/ -> ./results/
#   PROMPT_FILE=./data/test_prompts.txt IMAGE_BASE_DIR=./inference_output/ bash scripts/evaluate.sh
#   bash scripts/evaluate.sh --metrics hpsv2 pickscore clipscore aesthetic   # extra flags go to evaluate_hps.py
#   bash scripts/evaluate.sh --help                       # this text; runs nothing
# Variables: PROMPT_FILE, IMAGE_BASE_DIR, RESULTS_DIR, HPS_VERSION. Outputs in $RESULTS_DIR: hpsv2_evaluation.csv,
# summary.json, *_scatter_*.png, *_diff_hist_*.png, report.html. All flags: python scripts/evaluate_hps.py --help
source "$(dirname "${BASH_SOURCE[0]}")/usage.sh"
set -euo pipefail
cd "$(dirname "$0")/.."

PROMPT_FILE="${PROMPT_FILE:-./data/test_prompts.txt}"
IMAGE_BASE_DIR="${IMAGE_BASE_DIR:-./inference_output/}"
RESULTS_DIR="${RESULTS_DIR:-./results/}"
HPS_VERSION="${HPS_VERSION:-v2.1}"

python scripts/evaluate_hps.py \
  --prompt_file "$PROMPT_FILE" \
  --image_base_dir "$IMAGE_BASE_DIR" \
  --results_dir "$RESULTS_DIR" \
  --hps_version "$HPS_VERSION" \
  "$@"

echo "Open ${RESULTS_DIR%/}/report.html in a browser to see the images side by side."
