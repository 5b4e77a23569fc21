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
SETTINGS=${SETTINGS:-full low mid high}
THR_LOW=${THR_LOW:-siglip-so400m-patch14-384-128out}    # placeholders: not checked against the paper
THR_MID=${THR_MID:-siglip-so400m-patch14-384-256out}
THR_HIGH=${THR_HIGH:-siglip-so400m-patch14-384-512out}
VTU=${VTU:-fast}
BATCH_SIZE=${BATCH_SIZE:-1}
MODEL_ARGS_EXTRA=${MODEL_ARGS_EXTRA:-}
LMMS_ARGS=${LMMS_ARGS:-}
PYTHON=${PYTHON:-python}
PORT=${PORT:-29518}
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
fi
[ "${NUM_GPUS:-0}" -ge 1 ] 2>/dev/null || NUM_GPUS=1
if [ "$NUM_GPUS" -gt 1 ]; then
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
    full) dymu_args="dymu=false" ;;
    low)  dymu_args="thresholds=$THR_LOW,vtu=$VTU" ;;
    mid)  dymu_args="thresholds=$THR_MID,vtu=$VTU" ;;
    high) dymu_args="thresholds=$THR_HIGH,vtu=$VTU" ;;
    *) echo "unknown setting '$setting' (expected full, low, mid, high)" >&2; exit 2 ;;
  esac
  # shellcheck disable=SC2086
  run "${LAUNCH[@]}" --model dymu_llava_onevision \
    --model_args "pretrained=$MODEL,$dymu_args$MODEL_ARGS_EXTRA" \
    --tasks "$TASKS" --batch_size "$BATCH_SIZE" \
    --output_path "$OUTPUT/$setting" --log_samples $LMMS_ARGS
done
