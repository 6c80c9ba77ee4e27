#!/usr/bin/env bash
# Run any training script on NPROC simulated ranks on this machine: CPU only, gloo between the ranks.
# Starts the ranks with torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set for each); the script
# initialises its process group as usual -- torch.distributed.init_process_group("gloo") or
# deepspeed.init_distributed() (DeepSpeed's CPU accelerator chooses gloo).
#
# Variables (all optional):
#   NPROC        ranks to start                 (default 4)
#   MASTER_PORT  rendezvous port                (default 29741)
#   PYTHON       interpreter                    (default python3)
#   THREADS      torch/OpenMP threads per rank  (default 1: the ranks share the cores)
# Usage:  launch/local_gloo.sh train.py [script args]       launch/local_gloo.sh -m package.module [args]
#         NPROC=2 launch/local_gloo.sh -m zclip_dist.deepspeed.launch examples/train_deepspeed.py --steps 8
set -euo pipefail
if [ $# -eq 0 ]; then
  echo "usage: launch/local_gloo.sh SCRIPT.py [args] | -m MODULE [args]" >&2
  exit 2
fi
PY=${PYTHON:-python3}
export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${THREADS:-1}
exec "$PY" -m torch.distributed.run --nnodes 1 --nproc_per_node "${NPROC:-4}" \
  --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29741}" "$@"
