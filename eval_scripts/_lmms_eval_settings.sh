# Shared by lmms_eval_llava15.sh, lmms_eval_llava_onevision.sh and lmms_eval_qwen2_5_vl.sh (sourced, not run):
# launches lmms-eval once per setting (full / low / mid / high; tome / prune / random at $TOKEN_BUDGET tokens per
# image) for the dymu model backend $BACKEND. The caller sets MODEL, OUTPUT, TASKS,
# PORT, BACKEND and THR_LOW/MID/HIGH defaults; everything else can be overridden from the environment.
SETTINGS=${SETTINGS:-full low mid high}
VTU=${VTU:-fast}                                # fast | exact | off
BATCH_SIZE=${BATCH_SIZE:-1}                     # per GPU; > 1 batches images with different token counts
MODEL_ARGS_EXTRA=${MODEL_ARGS_EXTRA:-}          # appended to --model_args, e.g. ",dtype=bfloat16"
LMMS_ARGS=${LMMS_ARGS:-}                        # more lmms-eval arguments, e.g. "--limit 16"
PYTHON=${PYTHON:-python}
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

run_settings() {
  local setting dymu_args
  for setting in $SETTINGS; do
    case "$setting" in
      full) dymu_args="dymu=false" ;;                  # the stock model: every visual token
      low)  dymu_args="thresholds=$THR_LOW,vtu=$VTU" ;;
      mid)  dymu_args="thresholds=$THR_MID,vtu=$VTU" ;;
      high) dymu_args="thresholds=$THR_HIGH,vtu=$VTU" ;;
      tome) dymu_args="method=tome,token_budget=${TOKEN_BUDGET:?set TOKEN_BUDGET},vtu=$VTU" ;;
      prune|random) dymu_args="method=$setting,token_budget=${TOKEN_BUDGET:?set TOKEN_BUDGET}" ;;
      *) echo "unknown setting '$setting' (expected full, low, mid, high, tome, prune, random)" >&2; exit 2 ;;
    esac
    # shellcheck disable=SC2086  # LMMS_ARGS is a list of words
    run "${LAUNCH[@]}" --model "$BACKEND" \
      --model_args "pretrained=$MODEL,$dymu_args$MODEL_ARGS_EXTRA" \
      --tasks "$TASKS" --batch_size "$BATCH_SIZE" \
      --output_path "$OUTPUT/$setting" --log_samples $LMMS_ARGS
  done
}
