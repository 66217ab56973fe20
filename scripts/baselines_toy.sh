#!/usr/bin/env bash
# Does the sequence matter? The README's learned-noise baselines on the built-in toy world, in one command.
# Usage:
#   bash scripts/quickstart.sh && bash scripts/baselines_toy.sh   # needs the quickstart's data, RNN and held-out pairs
#   bash scripts/baselines_toy.sh --help                          # this text; runs nothing
# 1. the stage-2 sequences: the quickstart's own (26,400 training (caption, seed) pairs, n = NUM_STEPS = 2 golden
#    steps; nothing to do); with NUM_STEPS=3 (or another n) stage 2 makes new ones on the same pairs into
#    data/baselines/npd_n$NUM_STEPS
# 2. train, on 100%, 30% and 10% of the training sequences (--train_fraction, nested subsets by id), with the
#    quickstart's recipe (batch 32, 2,500 steps, lr 1e-3): gnsnet (NoiseSequenceRNN_v3, the quickstart's architecture;
#    with n = 2 its 100% run is the quickstart's own RNN, output/quickstart: the same data, flags and seed), direct
#    (DirectNoiseModel: the same network, x_T -> x'_n in one step) and npnet (NPNet's architecture at toy size, about
#    as many parameters) -> output/baselines/{rnn_v3,direct,npnet}_f{1.0,0.3,0.1}/
# 3. the sweep on the quickstart's 240 held-out pairs with the 100% models: guidance {1, 1.5, 2} x DDIM steps {4, 20}
#    x {standard, gnsnet n = 1..n+1, direct, npnet, oracle n = 1..n+1, best_of_4}, plus standard noise alone at 5,
#    7, 21 and 23 steps for the matched-compute comparison -> results/baselines/sweep/
# 4. the data-efficiency sweeps (w = 1, 4 and 20 steps, at n) with the 30% and 10% models -> results/baselines/data_f*/
# 5. the README's tables: scripts/baselines_summary.py
# Rerun to resume: stage 2 and the sweeps resume, a finished training is skipped. One process throughout; measured
# in pieces on a 2-core machine busy with other jobs: each training 5-54 min (238 min for the eight), the sweeps 72,
# 7 and 1 min; 2 h 15 min with two or three pieces side by side (README, "Does the sequence matter?"). Variables:
# WORLD, QUICK_DATA, QUICK_RNN, NUM_STEPS, DATA, OUT, RESULTS, FRACTIONS.
source "$(dirname "${BASH_SOURCE[0]}")/usage.sh"
set -euo pipefail
cd "$(dirname "$0")/.."

WORLD="${WORLD:-worlds/toy_shapes}"
QUICK="${QUICK_DATA:-data/quickstart}"             # the quickstart's prompts.txt and test_prompts.txt
QUICK_RNN="${QUICK_RNN:-output/quickstart}"         # the quickstart's RNN (the 100% gnsnet when n = 2)
NUM_STEPS="${NUM_STEPS:-2}"                          # n of the stage-2 sequences (2: the quickstart's)
if [ "$NUM_STEPS" = 2 ]; then DATA="${DATA:-$QUICK/npd_sequences}"; else DATA="${DATA:-data/baselines/npd_n$NUM_STEPS}"; fi
OUT="${OUT:-output/baselines}"
RESULTS="${RESULTS:-results/baselines}"
FRACTIONS="${FRACTIONS:-1.0 0.3 0.1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
if [ ! -f "$QUICK/prompts.txt" ] || [ ! -f "$QUICK/test_prompts.txt" ]; then
  echo "error: $QUICK/prompts.txt or $QUICK/test_prompts.txt is missing: run 'bash scripts/quickstart.sh' first" >&2
  exit 2
fi
start=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }

step "1/5 stage 2: $(wc -l < "$QUICK/prompts.txt") training pairs x n=$NUM_STEPS -> $DATA (resumes: nothing to do if complete)"
python src/generate_npd_series.py --prompt_file "$QUICK/prompts.txt" --output_dir "$DATA" --base_model_id "$WORLD" \
  --num_steps "$NUM_STEPS" --batch_size 64 --device cpu --start_seed 0 --text_embedding pooled+mean_token

RECIPE=(--batch_size 32 --learning_rate 1e-3 --lr_warmup_steps 50 --max_train_steps 2500 --validation_fraction 0.1
        --save_steps 500 --max_checkpoints 1 --dataloader_num_workers 0 --mixed_precision no)
CNN=(--cnn_base_filters 32 --cnn_num_blocks 2 2 --cnn_feat_dim 128 --gru_hidden_size 256 --gru_num_layers 1
     --text_proj_dim 64)                           # the quickstart's RNN, 0.73M parameters
NPNET=(--svd_hidden_dim 64 --svd_mlp_dim 256 --svd_num_heads 8 --swin_img_size 16 --swin_patch_size 2
       --swin_embed_dim 72 --swin_depths 2 2 --swin_num_heads 2 4 --swin_window_size 4 --swin_num_classes 0)  # 0.69M
declare -A TYPE=([rnn_v3]=NoiseSequenceRNN_v3 [direct]=DirectNoiseModel [npnet]=NPNet)  # run folder -> model type
for model in direct npnet rnn_v3; do
  for f in $FRACTIONS; do
    run="$OUT/${model}_f$f"
    if [ "$model $f $NUM_STEPS" = "rnn_v3 1.0 2" ] && [ ! -e "$run" ]; then  # the quickstart's RNN: link it
      if [ ! -f "$QUICK_RNN/rnn_v3_model_final.safetensors" ]; then
        echo "error: $QUICK_RNN/rnn_v3_model_final.safetensors is missing: run 'bash scripts/quickstart.sh' first" >&2
        exit 2
      fi
      mkdir -p "$OUT" && ln -s "$PWD/$QUICK_RNN" "$run"
    fi
    if [ -f "$run/rnn_v3_model_final.safetensors" ]; then echo "$run: trained"; continue; fi
    if [ "$model" = npnet ]; then ARCH=("${NPNET[@]}"); else ARCH=("${CNN[@]}"); fi
    step "2/5 train $model on ${f} of the sequences -> $run"
    python src/train_rnn_model_v3.py --dataset_dir "$DATA" --output_dir "$run" --model_type "${TYPE[$model]}" \
      --train_fraction "$f" "${ARCH[@]}" "${RECIPE[@]}" --resume_from_checkpoint latest
  done
done

COMMON=(--prompt_file "$QUICK/test_prompts.txt" --base_model_id "$WORLD" --metrics toy_attributes
        --reward_path "toy_attributes=$WORLD" --start_seed 1000000 --batch_size 48 --device cpu --no_progress)
step "3/5 the sweep with the 100% models -> $RESULTS/sweep"
python scripts/sweep.py "${COMMON[@]}" --output_dir "$RESULTS/sweep" --rnn_weights_path "$OUT/rnn_v3_f1.0" \
  --direct_weights "$OUT/direct_f1.0" --npnet_weights "$OUT/npnet_f1.0" --guidance_scales 1 1.5 2 \
  --num_inference_steps 4 20 --standard_steps 5 7 21 23 --num_gen_steps $(seq 1 $(( NUM_STEPS + 1 ))) \
  --methods standard gnsnet direct npnet oracle best_of_4

for f in $FRACTIONS; do
  [ "$f" = 1.0 ] && continue
  step "4/5 data efficiency: the ${f} models -> $RESULTS/data_f$f"
  python scripts/sweep.py "${COMMON[@]}" --output_dir "$RESULTS/data_f$f" --rnn_weights_path "$OUT/rnn_v3_f$f" \
    --direct_weights "$OUT/direct_f$f" --npnet_weights "$OUT/npnet_f$f" --guidance_scales 1 \
    --num_inference_steps 4 20 --num_gen_steps "$NUM_STEPS" --methods standard gnsnet direct npnet oracle
done

step "5/5 the README's tables"
python scripts/baselines_summary.py --results_dir "$RESULTS" --runs_dir "$OUT" --fractions $FRACTIONS \
  --num_steps "$NUM_STEPS"
echo "total: $(( $(date +%s) - start ))s"
