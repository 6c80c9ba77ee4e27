#!/usr/bin/env bash
# ZClip + DeepSpeed on this machine through the `deepspeed` launcher (one node, NPROC ranks).
# On a CPU-only machine DeepSpeed picks its CPU accelerator and the example script uses gloo.
#
# Variables (all optional):
#   NPROC          ranks to start                        (default 2; --num_gpus, also used on CPU)
#   MASTER_PORT    rendezvous port                       (default 29734)
#   SCRIPT         training script                       (default examples/train_deepspeed.py)
#   DEEPSPEED      launcher executable                   (default: `deepspeed` next to python, else PATH)
#   DS_ACCELERATOR set to "cpu" to force the CPU accelerator; unset = auto-detect
# Arguments are passed to the script:  launch/deepspeed_local.sh --steps 8 --zero-stage 1
set -euo pipefail
cd "$(dirname "$0")/.."
PY_BIN=$(dirname "$(command -v "${PYTHON:-python}")")
DEEPSPEED=${DEEPSPEED:-$( [ -x "$PY_BIN/deepspeed" ] && echo "$PY_BIN/deepspeed" || echo deepspeed )}
# The launcher starts `python -m zclip_dist.deepspeed.launch`; put the environment's bin first so it is this python.
export PATH="$PY_BIN:$PATH"
exec "$DEEPSPEED" --num_gpus "${NPROC:-2}" --master_port "${MASTER_PORT:-29734}" \
  --module zclip_dist.deepspeed.launch "${SCRIPT:-examples/train_deepspeed.py}" "$@"
