#!/usr/bin/env bash
# Where golden noise pays, on the built-in toy world: the README's sweep, in one command.
# Usage:
#   bash scripts/quickstart.sh && bash scripts/sweep_toy.sh     # the sweep needs the quickstart's RNN and test pairs
#   bash scripts/sweep_toy.sh [scripts/sweep.py flags]          # extra flags go to both sweeps (e.g. --no_progress)
#   NUM_PROCESSES=1 bash scripts/sweep_toy.sh                   # one process (default: 2, one per core)
#   bash scripts/sweep_toy.sh --help                            # this text; runs nothing
# 1. the base sampler: guidance {1, 1.5, 2, 3.5, 5.5} x DDIM steps {4, 20} x {standard, gnsnet, oracle, best_of_4}
#    x rollout lengths n {1, 2, 3}, on the quickstart's 240 held-out (caption, seed) pairs -> results/sweep_toy/
# 2. the world's distilled student (worlds/toy_shapes/student) as a separate sampler: golden noise made by the
#    teacher (gnsnet, oracle), sampled by the student in 1, 2 and 4 steps without guidance -> results/sweep_toy_student/
# Both run through scripts/sweep.py in NUM_PROCESSES processes (accelerate, one per core); rerun to resume. 264 s
# on a quiet 2-core machine, 418-1636 s on busy ones; 126 MB and 30,000 files on disk. Variables: RNN, PROMPTS,
# WORLD, OUT, NUM_PROCESSES.
source "$(dirname "${BASH_SOURCE[0]}")/usage.sh"
set -euo pipefail
cd "$(dirname "$0")/.."

RNN="${RNN:-output/quickstart}"                       # the quickstart's RNN export (trained on n = 2 sequences)
PROMPTS="${PROMPTS:-data/quickstart/test_prompts.txt}"  # 24 held-out captions x 10 new seeds
WORLD="${WORLD:-worlds/toy_shapes}"
OUT="${OUT:-results/sweep_toy}"
NUM_PROCESSES="${NUM_PROCESSES:-2}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
if [ ! -f "$RNN/rnn_v3_model_final.safetensors" ] || [ ! -f "$PROMPTS" ]; then
  echo "error: $RNN/rnn_v3_model_final.safetensors or $PROMPTS is missing: run 'bash scripts/quickstart.sh' first" >&2
  exit 2
fi
if [ "$NUM_PROCESSES" -gt 1 ]; then
  export ACCELERATE_USE_CPU=1
  LAUNCH=(python -m accelerate.commands.launch --multi_gpu --num_processes "$NUM_PROCESSES" --num_machines 1
          --mixed_precision no --dynamo_backend no)
else
  LAUNCH=(python)
fi
COMMON=(--prompt_file "$PROMPTS" --rnn_weights_path "$RNN" --base_model_id "$WORLD" --metrics toy_attributes
        --reward_path "toy_attributes=$WORLD" --start_seed 1000000 --batch_size 48 --device cpu)
start=$(date +%s)

echo "=== 1/2 base sampler: $OUT"
"${LAUNCH[@]}" scripts/sweep.py "${COMMON[@]}" --output_dir "$OUT" \
  --guidance_scales 1 1.5 2 3.5 5.5 --num_inference_steps 4 20 --num_gen_steps 1 2 3 \
  --methods standard gnsnet oracle best_of_4 "$@"

echo "=== 2/2 the distilled student as sampler: ${OUT}_student"
"${LAUNCH[@]}" scripts/sweep.py "${COMMON[@]}" --output_dir "${OUT}_student" \
  --sampling_unet "$WORLD/student/unet" --scheduler ddim --timestep_spacing trailing \
  --guidance_scales 1 --num_inference_steps 1 2 4 --num_gen_steps 1 2 \
  --methods standard gnsnet oracle best_of_4 "$@"
echo "total: $(( $(date +%s) - start ))s; reports: $OUT/report.html ${OUT}_student/report.html"
