#!/usr/bin/env bash
# Quickstart: all six stages end to end on the built-in toy world, on CPU, from a fresh clone.
# Usage:
#   bash scripts/quickstart.sh                         # installs what it needs, then runs (5 min on 2 quiet cores)
#   CPU_ONLY=1 bash scripts/quickstart.sh              # install torch as CPU-only wheels (no 3 GB of CUDA libraries)
#   EVAL_ON=seen_captions bash scripts/quickstart.sh   # evaluate on new seeds of 24 training captions instead
#   QUICK=1 bash scripts/quickstart.sh                 # a 2-3 minute smoke run of the same path (tiny sizes)
#   SKIP_INSTALL=1 RUN=mine bash scripts/quickstart.sh # no install step; outputs in data/mine, output/mine, ...
#   bash scripts/quickstart.sh --help                  # this text; runs and deletes nothing
# A run first deletes data/$RUN, output/$RUN, inference_output/$RUN and results/$RUN (RUN=quickstart), then
# writes them anew (about 70 MB and 760 files). The world (worlds/toy_shapes) is a diffusers
# StableDiffusionXLPipeline trained on 32x32 images of coloured shapes, with a reward model that scores prompt
# adherence; every stage loads it with --base_model_id exactly as it would load SDXL. Every variable below can be
# overridden from the environment.
source "$(dirname "${BASH_SOURCE[0]}")/usage.sh"
set -euo pipefail
cd "$(dirname "$0")/.."

WORLD="${WORLD:-worlds/toy_shapes}"
RUN="${RUN:-quickstart}"                 # names data/$RUN, output/$RUN, inference_output/$RUN, results/$RUN
NUM_STEPS="${NUM_STEPS:-2}"             # n: golden steps per sequence (and rolled out at inference)
TEST_CAPTIONS="${TEST_CAPTIONS:-24}"     # captions held out from training (unseen attribute combinations)
SPLIT_SEED="${SPLIT_SEED:-0}"             # which captions are held out (extract_prompts --seed)
EVAL_ON="${EVAL_ON:-held_out_captions}" # held_out_captions: never trained on; seen_captions: new seeds of 24 training ones
TRAIN_REPEATS="${TRAIN_REPEATS:-100}"    # training (caption, seed) pairs per caption
TEST_REPEATS="${TEST_REPEATS:-10}"       # evaluation (caption, seed) pairs per evaluated caption
TRAIN_STEPS="${TRAIN_STEPS:-2500}"
SAMPLE_GUIDANCE="${SAMPLE_GUIDANCE:-1.0}" # sampling CFG: golden noise matters most where guidance is weak
SAMPLE_STEPS="${SAMPLE_STEPS:-20}"
TEXT_EMBEDDING="${TEXT_EMBEDDING:-pooled+mean_token}"  # the RNN's text input (the pooled one alone loses the position words)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
if [ -n "${QUICK:-}" ]; then
  TRAIN_REPEATS=2; TEST_REPEATS=2; TRAIN_STEPS=40; RUN="${RUN}_quick"
fi
DATA="data/$RUN"; OUT="output/$RUN"; IMAGES="inference_output/$RUN"; RESULTS="results/$RUN"
start=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }

if [ -z "${SKIP_INSTALL:-}" ]; then
  step "install (bash scripts/install.sh: pip install -r requirements.txt && pip install -e .)"
  bash scripts/install.sh
fi
if [ ! -f "$WORLD/model_index.json" ]; then
  step "build the toy world into $WORLD (about 10 min on 2 cores)"
  python scripts/build_toy_world.py --output_dir "$WORLD" --preset default
fi
rm -rf "$DATA" "$OUT" "$IMAGES" "$RESULTS"   # a quickstart always starts clean; the stages themselves resume

step "1/6 prompts: extract the world's captions through the datasets path, hold out $TEST_CAPTIONS"
python scripts/extract_prompts.py --dataset_name "$WORLD/prompts.txt" --output_dir "$DATA" \
  --output_filename captions.txt --test_size "$TEST_CAPTIONS" --test_filename test_captions.txt --seed "$SPLIT_SEED"
# one line per (caption, seed) pair: line i gets seed start_seed + i
for _ in $(seq "$TRAIN_REPEATS"); do cat "$DATA/captions.txt"; done > "$DATA/prompts.txt"
case "$EVAL_ON" in   # evaluation seeds (from 1000000 on) are never used in training either way
  seen_captions) head -n "$TEST_CAPTIONS" "$DATA/captions.txt" > "$DATA/eval_captions.txt" ;;
  held_out_captions) cp "$DATA/test_captions.txt" "$DATA/eval_captions.txt" ;;
  *) echo "error: EVAL_ON must be seen_captions or held_out_captions, got '$EVAL_ON'" >&2; exit 2 ;;
esac
for _ in $(seq "$TEST_REPEATS"); do cat "$DATA/eval_captions.txt"; done > "$DATA/test_prompts.txt"

step "2/6 golden-noise sequences: $(wc -l < "$DATA/prompts.txt") prompts x n=$NUM_STEPS"
python src/generate_npd_series.py --prompt_file "$DATA/prompts.txt" --output_dir "$DATA/npd_sequences" \
  --base_model_id "$WORLD" --num_steps "$NUM_STEPS" --batch_size 64 --device cpu --start_seed 0 \
  --text_embedding "$TEXT_EMBEDDING"

step "3/6 train NoiseSequenceRNN_v3 ($TRAIN_STEPS steps)"
python src/train_rnn_model_v3.py --dataset_dir "$DATA/npd_sequences" --output_dir "$OUT" \
  --cnn_base_filters 32 --cnn_num_blocks 2 2 --cnn_feat_dim 128 --gru_hidden_size 256 --gru_num_layers 1 \
  --text_proj_dim 64 --batch_size 32 --learning_rate 1e-3 --lr_warmup_steps 50 --max_train_steps "$TRAIN_STEPS" \
  --validation_fraction 0.1 --save_steps 500 --max_checkpoints 1 --dataloader_num_workers 0 \
  --mixed_precision no

step "4-5/6 batch inference on $(wc -l < "$DATA/test_prompts.txt") held-out (caption, seed) pairs ($EVAL_ON): standard, gnsnet, oracle"
python scripts/batch_inference.py --prompt_file "$DATA/test_prompts.txt" --output_base_dir "$IMAGES" \
  --rnn_weights_path "$OUT" --base_model_id "$WORLD" --methods standard gnsnet oracle --start_seed 1000000 \
  --num_inference_steps "$SAMPLE_STEPS" --guidance_scale "$SAMPLE_GUIDANCE" --batch_size 50 --device cpu

step "6/6 evaluate with the world's reward (toy_attributes)"
python scripts/evaluate_hps.py --prompt_file "$DATA/test_prompts.txt" --image_base_dir "$IMAGES" \
  --results_dir "$RESULTS" --metrics toy_attributes --reward_path "toy_attributes=$WORLD" --device cpu
python scripts/quickstart_summary.py --results_dir "$RESULTS" --run_dir "$OUT" --images_dir "$IMAGES" \
  --prompt_file "$DATA/test_prompts.txt"
echo "total: $(( $(date +%s) - start ))s"
