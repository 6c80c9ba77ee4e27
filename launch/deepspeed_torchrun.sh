#!/usr/bin/env bash
# ZClip + DeepSpeed through torchrun, one node. The training script stays unchanged: zclip_dist.deepspeed.launch
# makes its deepspeed.initialize attach ZClip when the config has a "zclip" entry.
#
# Variables (all optional):
#   NPROC          processes on this node                (default 2)
#   NNODES         number of nodes                       (default 1)
#   NODE_RANK      this node's rank                      (default 0)
#   MASTER_ADDR    rendezvous host                       (default 127.0.0.1)
#   MASTER_PORT    rendezvous port                       (default 29733)
#   SCRIPT         training script                       (default examples/train_deepspeed.py)
#   PYTHON         interpreter whose torchrun to use     (default python)
#   DS_ACCELERATOR set to "cpu" to force the CPU accelerator (gloo); unset = auto-detect
# Arguments after the script's name are passed to the script, e.g.
#   launch/deepspeed_torchrun.sh --steps 8 --zero-stage 3
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
exec "${PYTHON:-python}" -m torch.distributed.run --nproc_per_node "$NPROC" --nnodes "${NNODES:-1}" \
  --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29733}" \
  -m zclip_dist.deepspeed.launch "${SCRIPT:-examples/train_deepspeed.py}" "$@"
