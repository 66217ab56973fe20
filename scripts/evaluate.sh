#!/usr/bin/env bash
# Stage 6: score the images written by batch inference and compare golden noise with standard noise.
# (The original project's spelling, scripts/evalute.sh, runs this script.) Override any variable from the environment:
#   PROMPT_FILE=./data/test_prompts.txt IMAGE_BASE_DIR=./inference_output/ bash scripts/evaluate.sh
# Extra arguments are passed on, e.g. `bash scripts/evaluate.sh --metrics hpsv2 pickscore clipscore aesthetic`.
# Outputs in $RESULTS_DIR: hpsv2_evaluation.csv, summary.json, *_scatter_*.png, *_diff_hist_*.png, report.html.
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
