#!/usr/bin/env bash
# The DyMU paper's LLaVA-OneVision runs through lmms-eval: full model and DyMU-low / -mid / -high with the
# authors' SigLIP SO400M/14-384 thresholds.
#
# NOT RUNNABLE YET: dymu implements DyMU for LLaVA-1.5 only; --model dymu_llava_onevision is registered but
# refuses to start ("LLaVA-OneVision is not supported by dymu yet ..."). The script is here so that the runs are
# ready when it is. The threshold names below are placeholders in dymu's naming (siglip-so400m-patch14-384-<K>out,
# K = patch tokens kept per crop on average, of 729): set THR_LOW/MID/HIGH to the authors' released settings.
#
#   DRY_RUN=1 bash eval_scripts/lmms_eval_llava_onevision.sh
set -euo pipefail

MODEL=${MODEL:-lmms-lab/llava-onevision-qwen2-7b-si}
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
