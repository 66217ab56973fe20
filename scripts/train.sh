#!/usr/bin/env bash
# Stage 3: train NoiseSequenceRNN_v3 on the golden-noise sequence dataset of stage 2 (the seed's command).
# Usage:
#   bash scripts/train.sh                                 # DATASET_DIR -> OUTPUT_DIR, one process
#   NUM_PROCESSES=8 bash scripts/train.sh                 # 8 GPUs on this machine (DDP through accelerate)
#   EXTRA_ARGS="--resume_from_checkpoint latest" bash scripts/train.sh   # continue an interrupted run exactly
#   EXTRA_ARGS="--max_train_steps 2" DATASET_DIR=./data/tiny_ds bash scripts/train.sh   # a CPU smoke run
#   bash scripts/train.sh --help                          # this text; trains nothing
# The latent shape (--noise_resolution) and text-embedding size come from the dataset's run_config.json, and
# the script follows the launcher's --mixed_precision. Variables: DATASET_DIR (./data/npd_sequence_dataset_sdxl/),
# OUTPUT_DIR (./output/rnn_v3_seq_model_output/), NUM_PROCESSES (1), MIXED_PRECISION (fp16), EXTRA_ARGS.
# Multi-node: add accelerate's --num_machines/--machine_rank/--main_process_ip flags (or `accelerate config`).
# Watch it: tensorboard --logdir ./output/rnn_v3_seq_model_output/logs
# All flags: python src/train_rnn_model_v3.py --help
source "$(dirname "${BASH_SOURCE[0]}")/usage.sh"
set -euo pipefail
cd "$(dirname "$0")/.."

DATASET_DIR="${DATASET_DIR:-./data/npd_sequence_dataset_sdxl/}"
OUTPUT_DIR="${OUTPUT_DIR:-./output/rnn_v3_seq_model_output/}"
NUM_PROCESSES="${NUM_PROCESSES:-1}"
MIXED_PRECISION="${MIXED_PRECISION:-fp16}"
EXTRA_ARGS="${EXTRA_ARGS:-}"

LAUNCH=(accelerate launch --num_processes "$NUM_PROCESSES" --num_machines 1 --mixed_precision "$MIXED_PRECISION"
        --dynamo_backend no)
if [ "$NUM_PROCESSES" -gt 1 ]; then LAUNCH+=(--multi_gpu); fi

# shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
"${LAUNCH[@]}" src/train_rnn_model_v3.py \
  --dataset_dir "$DATASET_DIR" \
  --output_dir "$OUTPUT_DIR" \
  --cnn_base_filters 64 \
  --cnn_num_blocks 2 2 2 2 \
  --cnn_feat_dim 512 \
  --gru_hidden_size 1024 \
  --gru_num_layers 2 \
  --predict_variance \
  --kl_weight 0.01 \
  --num_epochs 50 \
  --batch_size 8 \
  --gradient_accumulation_steps 4 \
  --learning_rate 1e-4 \
  --save_steps 1000 \
  --max_checkpoints 3 \
  $EXTRA_ARGS

# The export for inference: $OUTPUT_DIR/rnn_v3_model_final.safetensors + .json; held-out report: validation.json
