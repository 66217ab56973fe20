#!/usr/bin/env bash
# Stages 4-5: images from a trained RNN's golden noise, beside the standard images from the same seeds.
# Usage:
#   bash scripts/inference.sh                             # one prompt (stage 4), then every prompt of a file (5)
#   RNN_WEIGHTS=./output/rnn_v3_seq_model_output/rnn_v3_model_final DTYPE=float32 bash scripts/inference.sh
#   NUM_PROCESSES=8 bash scripts/inference.sh             # multi-GPU batch inference: the same files
#   EXTRA_FLAGS="--enable_model_cpu_offload --enable_vae_tiling" bash scripts/inference.sh   # low on GPU memory
#   bash scripts/inference.sh --help                      # this text; runs nothing
# Variables: RNN_WEIGHTS, BASE_MODEL_ID, PROMPT, PROMPT_FILE, OUTPUT_DIR, NUM_GEN_STEPS, NUM_INFERENCE_STEPS,
# GUIDANCE_SCALE, DTYPE, EXTRA_FLAGS, NUM_PROCESSES. The pipeline and resolution default to the ones the RNN was
# trained with (read from its export); DTYPE=auto is float16 on CUDA and float32 elsewhere.
# All flags: python src/inference_rnn.py --help; python scripts/batch_inference.py --help
source "$(dirname "${BASH_SOURCE[0]}")/usage.sh"
set -euo pipefail
cd "$(dirname "$0")/.."

RNN_WEIGHTS="${RNN_WEIGHTS:-./output/rnn_v3_seq_model_output/rnn_v3_model_final}"
BASE_MODEL_ID="${BASE_MODEL_ID:-stabilityai/stable-diffusion-xl-base-1.0}"
PROMPT="${PROMPT:-A futuristic cityscape at sunset, synthwave style}"
PROMPT_FILE="${PROMPT_FILE:-./data/test_prompts.txt}"
OUTPUT_DIR="${OUTPUT_DIR:-./inference_output/}"
NUM_GEN_STEPS="${NUM_GEN_STEPS:-10}"
NUM_INFERENCE_STEPS="${NUM_INFERENCE_STEPS:-30}"
GUIDANCE_SCALE="${GUIDANCE_SCALE:-5.5}"
DTYPE="${DTYPE:-auto}"
read -r -a EXTRA <<< "${EXTRA_FLAGS:-}"   # more flags for both stages, e.g. the memory savers
NUM_PROCESSES="${NUM_PROCESSES:-1}"

# 1. One prompt: the golden-noise image, the standard image from the same seed, and a JSON of every setting.
python src/inference_rnn.py \
  --rnn_weights_path "$RNN_WEIGHTS" \
  --prompt "$PROMPT" \
  --output_dir "$OUTPUT_DIR" \
  --base_model_id "$BASE_MODEL_ID" \
  --num_gen_steps "$NUM_GEN_STEPS" \
  --num_inference_steps "$NUM_INFERENCE_STEPS" \
  --guidance_scale "$GUIDANCE_SCALE" \
  --seed 12345 \
  --generate_standard \
  --dtype "$DTYPE" ${EXTRA[@]+"${EXTRA[@]}"}

# 2. Every prompt of a file: ${OUTPUT_DIR}{standard,gnsnet}_output/{index}.png, seed = 1000 + index,
#    plus manifest.csv and summary.json. Rerun to resume; add `--methods standard gnsnet oracle` for the upper bound.
if [ "$NUM_PROCESSES" -gt 1 ]; then
  LAUNCH=(accelerate launch --num_processes "$NUM_PROCESSES")
else
  LAUNCH=(python)
fi
"${LAUNCH[@]}" scripts/batch_inference.py \
  --prompt_file "$PROMPT_FILE" \
  --output_base_dir "$OUTPUT_DIR" \
  --rnn_weights_path "$RNN_WEIGHTS" \
  --base_model_id "$BASE_MODEL_ID" \
  --num_gen_steps "$NUM_GEN_STEPS" \
  --num_inference_steps "$NUM_INFERENCE_STEPS" \
  --guidance_scale "$GUIDANCE_SCALE" \
  --start_seed 1000 \
  --dtype "$DTYPE" ${EXTRA[@]+"${EXTRA[@]}"}
