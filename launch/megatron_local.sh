#!/usr/bin/env bash
# Megatron-LM's stock pretrain_gpt.py with ZClip on one machine: a single process, or NPROC local ranks.
#
# Variables:
#   MEGATRON_LM_PATH  Megatron-LM checkout (tag core_v0.16.1 to core_v0.19.0), required
#   NPROC             local processes (default 1); more than one goes through torchrun on this host
#   ZCLIP_ARGS        ZClip flags (default "--zclip" when unset; set it empty for a run without ZClip)
#   PYTHON            the interpreter (default python3): the one with torch, megatron-core and zclip_dist
# Arguments: Megatron-LM arguments for pretrain_gpt.py.
#
#   MEGATRON_LM_PATH=~/Megatron-LM launch/megatron_local.sh --num-layers 2 ... --mock-data --clip-grad 1.0
set -euo pipefail
: "${MEGATRON_LM_PATH:?set MEGATRON_LM_PATH to a Megatron-LM checkout (tag core_v0.16.1 to core_v0.19.0)}"
NPROC="${NPROC:-1}"
if [[ "${NPROC}" -gt 1 ]]; then
  NPROC_PER_NODE="${NPROC}" NNODES=1 NODE_RANK=0 exec "$(dirname "$0")/megatron_torchrun.sh" "$@"
fi
export PYTHONPATH="${MEGATRON_LM_PATH}${PYTHONPATH:+:${PYTHONPATH}}"
export RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}" MASTER_PORT="${MASTER_PORT:-29500}"
# shellcheck disable=SC2086
exec "${PYTHON:-python3}" -m zclip_dist.megatron.launch "${MEGATRON_LM_PATH}/pretrain_gpt.py" "$@" ${ZCLIP_ARGS---zclip}
