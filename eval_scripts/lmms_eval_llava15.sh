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
THR_LOW=${THR_LOW:-ViT-L-14-336-tome-72out}     # DyMU names resolve in checkpoints/threshold_checkpoints/
THR_MID=${THR_MID:-ViT-L-14-336-tome-192out}    # (or $DYMU_CHECKPOINT_DIR): .safetensors or the authors' .pth
THR_HIGH=${THR_HIGH:-ViT-L-14-336-tome-384out}
TABLE_ARGS=${TABLE_ARGS:---paper}               # make_table.py arguments
PORT=${PORT:-29517}
BACKEND=dymu_llava
# shellcheck source=eval_scripts/_lmms_eval_settings.sh
source "$(dirname "$0")/_lmms_eval_settings.sh"
run_settings

# shellcheck disable=SC2086
run "$PYTHON" "$(dirname "$0")/make_table.py" "$OUTPUT" --output "$OUTPUT/table" $TABLE_ARGS
