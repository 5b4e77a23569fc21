#!/usr/bin/env bash
# Find DToMe thresholds for a DyMU encoder over an image dataset (wraps `dymu thresholds`; see its --help).
#
# The dataset is a JSON list of {"image": "relative/path.jpg"} records (LLaVA data files work) with the images
# under IMAGE_DIR. The checkpoint goes to checkpoints/threshold_checkpoints/<MODEL>.safetensors unless OUTPUT
# is set. A killed run continues from its last finished batch when started again with the same settings.
#
#   bash threshold_finding.sh                                      # defaults below, one process
#   NPROC=8 bash threshold_finding.sh                              # 8 GPUs of this node (torchrun, nccl)
#   MODEL=ViT-L-14-336-tome-192out BATCH_SIZE=64 bash threshold_finding.sh
#   MODEL=siglip-so400m-patch14-384-256out DATA=data/llava_v1_5_mix665k.json IMAGE_DIR=data bash threshold_finding.sh
#   MODEL=./my-clip bash threshold_finding.sh --out-tokens 100     # other encoders: give the budget
#   bash threshold_finding.sh --max-images 5000 --restart          # extra arguments go to `dymu thresholds`
#
# BATCH_SIZE is the global batch (all processes together): with the same BATCH_SIZE, NPROC processes give the
# same thresholds as one. Without a GPU, NPROC>1 runs CPU processes over gloo.
set -euo pipefail

MODEL=${MODEL:-ViT-L-14-336-tome-72out}           # DyMU name, transformers folder/hub name, open_clip:MODEL[:TAG]
DATA=${DATA:-data/threshold_finding.json}         # JSON list of {"image": "rel/path"}
IMAGE_DIR=${IMAGE_DIR:-data/images}               # folder the paths are relative to
BATCH_SIZE=${BATCH_SIZE:-32}                      # global batch size
NUM_WORKERS=${NUM_WORKERS:-4}                     # image loading workers per process
NPROC=${NPROC:-1}                                 # processes (GPUs) on this node
OUTPUT=${OUTPUT:-}                                # checkpoint path (default: derived from MODEL)
PYTHON=${PYTHON:-python}

args=(thresholds --model "$MODEL" --data "$DATA" --image-dir "$IMAGE_DIR"
      --batch-size "$BATCH_SIZE" --num-workers "$NUM_WORKERS")
if [[ -n "$OUTPUT" ]]; then
  args+=(--output "$OUTPUT")
fi

if [[ "$NPROC" -gt 1 ]]; then
  exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m dymu "${args[@]}" "$@"
else
  exec "$PYTHON" -m dymu "${args[@]}" "$@"
fi
