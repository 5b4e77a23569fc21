#!/usr/bin/env bash
# The DyMU paper's LLaVA-OneVision runs through lmms-eval: full model and DyMU-low / -mid / -high with the
# authors' SigLIP SO400M/14-384 thresholds.
#
# Runs --model dymu_llava_onevision (dymu.lmms_eval.onevision; token_order=batch, downsample=nearest by default).
# MODEL must be a llava-hf LLaVA-OneVision checkpoint (model_type llava_onevision), e.g.
# MODEL=llava-hf/llava-onevision-qwen2-7b-si-hf — transformers' conversion of lmms-lab/llava-onevision-qwen2-7b-si;
# dymu does not read the original lmms-lab (LlavaQwenForCausalLM) checkpoints and says so. The threshold names
# below are placeholders in dymu's naming (siglip-so400m-patch14-384-<K>out, K = patch tokens kept per crop on
# average, of 729): set THR_LOW/MID/HIGH to the authors' released settings (or checkpoints found with
# `dymu thresholds`); their checkpoints must exist in $DYMU_CHECKPOINT_DIR or ./checkpoints/threshold_checkpoints.
#
#   DRY_RUN=1 bash eval_scripts/lmms_eval_llava_onevision.sh
set -euo pipefail

MODEL=${MODEL:-llava-hf/llava-onevision-qwen2-7b-si-hf}
OUTPUT=${OUTPUT:-logs/llava_onevision}
TASKS=${TASKS:-gqa,mmbench_en_dev,mme,pope,scienceqa_img,seedbench,textvqa_val,mmvet,llava_in_the_wild}
THR_LOW=${THR_LOW:-siglip-so400m-patch14-384-128out}    # placeholders: not checked against the paper
THR_MID=${THR_MID:-siglip-so400m-patch14-384-256out}
THR_HIGH=${THR_HIGH:-siglip-so400m-patch14-384-512out}
PORT=${PORT:-29518}
BACKEND=dymu_llava_onevision
# shellcheck source=eval_scripts/_lmms_eval_settings.sh
source "$(dirname "$0")/_lmms_eval_settings.sh"
run_settings
