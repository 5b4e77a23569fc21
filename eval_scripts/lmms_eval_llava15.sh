#!/usr/bin/env bash
# The DyMU paper's LLaVA-1.5 benchmarks through lmms-eval (pip install 'dymu[eval]'): the full model and
# DyMU-low / -mid / -high (CLIP ViT-L/14-336 thresholds 72out / 192out / 384out), then the paper's table.
#
#   bash eval_scripts/lmms_eval_llava15.sh                       # all settings, all benchmarks, every GPU
#   SETTINGS="full low" TASKS=gqa,pope NUM_GPUS=4 bash eval_scripts/lmms_eval_llava15.sh
#   DRY_RUN=1 bash eval_scripts/lmms_eval_llava15.sh             # print the commands only
#
# Results: $OUTPUT/<setting>/<model>/<date>_results.json (+ _samples_*.jsonl, + _dymu_tokens.json: visual
# tokens per sample), and $OUTPUT/table.md / table.csv (eval_scripts/make_table.py). Reference numbers and what
# each benchmark needs (datasets from the hub; an OpenAI key for MMBench's answer matching, MM-Vet and
# LLaVA-Bench's GPT judges): docs/evaluation.md.
set -euo pipefail

MODEL=${MODEL:-llava-hf/llava-1.5-7b-hf}   # llava-hf or original LLaVA-1.5 folder, or a hub name
OUTPUT=${OUTPUT:-logs/llava15}
# lmms-eval 0.7.3 task names (lmms_eval/tasks/*.yaml): GQA, MMBench-EN dev, MME, POPE, ScienceQA-IMG,
# SEED-Bench (image score: seed_image), TextVQA val, MM-Vet, LLaVA-Bench in the wild
TASKS=${TASKS:-gqa,mmbench_en_dev,mme,pope,scienceqa_img,seedbench,textvqa_val,mmvet,llava_in_the_wild}
SETTINGS=${SETTINGS:-full low mid high}
THR_LOW=${THR_LOW:-ViT-L-14-336-tome-72out}     # DyMU names resolve in checkpoints/threshold_checkpoints/
THR_MID=${THR_MID:-ViT-L-14-336-tome-192out}    # (or $DYMU_CHECKPOINT_DIR): .safetensors or the authors' .pth
THR_HIGH=${THR_HIGH:-ViT-L-14-336-tome-384out}
VTU=${VTU:-fast}                                # fast | exact | off
BATCH_SIZE=${BATCH_SIZE:-1}                     # per GPU; > 1 batches images with different token counts
MODEL_ARGS_EXTRA=${MODEL_ARGS_EXTRA:-}          # appended to --model_args, e.g. ",dtype=bfloat16"
LMMS_ARGS=${LMMS_ARGS:-}                        # more lmms-eval arguments, e.g. "--limit 16"
TABLE_ARGS=${TABLE_ARGS:---paper}               # make_table.py arguments
PYTHON=${PYTHON:-python}
PORT=${PORT:-29517}
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
fi
[ "${NUM_GPUS:-0}" -ge 1 ] 2>/dev/null || NUM_GPUS=1

if [ "$NUM_GPUS" -gt 1 ]; then   # data parallel: lmms-eval shards the requests by rank
  LAUNCH=(accelerate launch --num_processes="$NUM_GPUS" --main_process_port "$PORT" -m lmms_eval)
else
  LAUNCH=("$PYTHON" -m lmms_eval)
fi

run() {
  echo "+ $*"
  if [ -z "${DRY_RUN:-}" ]; then "$@"; fi
}

for setting in $SETTINGS; do
  case "$setting" in
    full) dymu_args="dymu=false" ;;                  # stock model: 576 visual tokens per image
    low)  dymu_args="thresholds=$THR_LOW,vtu=$VTU" ;;
    mid)  dymu_args="thresholds=$THR_MID,vtu=$VTU" ;;
    high) dymu_args="thresholds=$THR_HIGH,vtu=$VTU" ;;
    *) echo "unknown setting '$setting' (expected full, low, mid, high)" >&2; exit 2 ;;
  esac
  # shellcheck disable=SC2086  # LMMS_ARGS is a list of words
  run "${LAUNCH[@]}" --model dymu_llava \
    --model_args "pretrained=$MODEL,$dymu_args$MODEL_ARGS_EXTRA" \
    --tasks "$TASKS" --batch_size "$BATCH_SIZE" \
    --output_path "$OUTPUT/$setting" --log_samples $LMMS_ARGS
done

# shellcheck disable=SC2086
run "$PYTHON" "$(dirname "$0")/make_table.py" "$OUTPUT" --output "$OUTPUT/table" $TABLE_ARGS
