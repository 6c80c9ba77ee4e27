#!/usr/bin/env bash
# Megatron-LM's stock pretrain_gpt.py with ZClip, through torchrun: one node or several.
#
# Variables (all optional except MEGATRON_LM_PATH):
#   MEGATRON_LM_PATH  Megatron-LM checkout (tag core_v0.16.1 to core_v0.19.0); its pretrain_gpt.py is run unmodified
#   NPROC_PER_NODE    processes per node (default: number of GPUs, else 1)
#   NNODES            number of nodes (default 1)
#   NODE_RANK         this node's rank (default 0); on a multi-node run set it per node
#   MASTER_ADDR       address of node 0 (default 127.0.0.1)
#   MASTER_PORT       port on node 0 (default 29500)
#   ZCLIP_ARGS        ZClip flags (default "--zclip" when unset, empty for none; e.g. "--zclip --zclip-z-thresh 2.5 --zclip-warmup-steps 25")
#   PYTHON            the interpreter (default python3); torchrun runs as "$PYTHON -m torch.distributed.run"
# Arguments: Megatron-LM arguments for pretrain_gpt.py (model size, data, --clip-grad = ZClip's cap, ...).
#
#   MEGATRON_LM_PATH=~/Megatron-LM NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/megatron_torchrun.sh <args>
set -euo pipefail
: "${MEGATRON_LM_PATH:?set MEGATRON_LM_PATH to a Megatron-LM checkout (tag core_v0.16.1 to core_v0.19.0)}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$("${PYTHON:-python3}" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
export PYTHONPATH="${MEGATRON_LM_PATH}${PYTHONPATH:+:${PYTHONPATH}}"
# shellcheck disable=SC2086  # ZCLIP_ARGS is a list of flags
exec "${PYTHON:-python3}" -m torch.distributed.run \
  --nproc-per-node "${NPROC_PER_NODE}" --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  -m zclip_dist.megatron.launch "${MEGATRON_LM_PATH}/pretrain_gpt.py" "$@" ${ZCLIP_ARGS---zclip}
