#!/usr/bin/env bash
# Qwen2.5-VL-7B with DyMU through lmms-eval, on the DyMU paper's benchmarks: the full model, DyMU-low / -mid / -high
# (thresholds found with `dymu thresholds` for the 7B tower), and the baselines at a fixed budget (ToMe in the
# tower, pruning after the merger, random dropping) — for a machine with the weights; not run in CI.
#
# Runs --model dymu_qwen_vl (dymu.lmms_eval.qwen_vl). MODEL: a Qwen2.5-VL checkpoint (model_type qwen2_5_vl).
# Threshold names are <tower identity>-tome-<P>pct (P = share of cells kept on the finding images, docs/qwen_vl.md);
# find them first, e.g.
#   dymu thresholds --encoder qwen2_5_vl-p14-d1280-l32 ... (see docs/qwen_vl.md, "Finding and naming")
# and put them in $DYMU_CHECKPOINT_DIR or ./checkpoints/threshold_checkpoints. The baselines keep TOKEN_BUDGET
# tokens per image (Qwen's count depends on the image size: set it near the DyMU setting's mean count).
#
#   DRY_RUN=1 bash eval_scripts/lmms_eval_qwen2_5_vl.sh
#   SETTINGS="full mid tome prune" TOKEN_BUDGET=256 bash eval_scripts/lmms_eval_qwen2_5_vl.sh
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}
OUTPUT=${OUTPUT:-logs/qwen2_5_vl}
TASKS=${TASKS:-gqa,mmbench_en_dev,mme,pope,scienceqa_img,seedbench,textvqa_val,mmmu_val,mmvet,llava_in_the_wild}
THR_LOW=${THR_LOW:-qwen2_5_vl-p14-d1280-l32-tome-25pct}
THR_MID=${THR_MID:-qwen2_5_vl-p14-d1280-l32-tome-50pct}
THR_HIGH=${THR_HIGH:-qwen2_5_vl-p14-d1280-l32-tome-75pct}
TOKEN_BUDGET=${TOKEN_BUDGET:-256}
MODEL_ARGS_EXTRA=${MODEL_ARGS_EXTRA:-,dtype=bfloat16}
PORT=${PORT:-29519}
BACKEND=dymu_qwen_vl
# shellcheck source=eval_scripts/_lmms_eval_settings.sh
source "$(dirname "$0")/_lmms_eval_settings.sh"
run_settings
TABLE_ARGS=${TABLE_ARGS:---benchmark MMMU=mmmu_val:mmmu_acc,none:100}  # MMMU is not among the LLaVA columns
# shellcheck disable=SC2086
run "$PYTHON" "$(dirname "$0")/make_table.py" "$OUTPUT" --output "$OUTPUT/table" $TABLE_ARGS
