#!/usr/bin/env bash
# ZClip + DeepSpeed on several nodes through the `deepspeed` launcher and a hostfile.
# The launcher reaches the other nodes with pdsh (default) or ssh/openmpi (LAUNCHER); every node needs the
# same environment and repository path. With a one-line hostfile naming localhost it runs locally.
#
# Variables (all optional):
#   HOSTFILE       "host slots=N" lines                  (default: a temporary one with "localhost slots=$NPROC")
#   NPROC          slots for the default hostfile        (default 2)
#   LAUNCHER       pdsh | openmpi | mvapich | slurm      (default: DeepSpeed's, pdsh)
#   MASTER_ADDR    address of the first host             (default: DeepSpeed picks the first host)
#   MASTER_PORT    rendezvous port                       (default 29735)
#   SCRIPT         training script                       (default examples/train_deepspeed.py)
#   DS_ACCELERATOR set to "cpu" to force the CPU accelerator; unset = auto-detect
set -euo pipefail
cd "$(dirname "$0")/.."
PY_BIN=$(dirname "$(command -v "${PYTHON:-python}")")
export PATH="$PY_BIN:$PATH"
if [ -z "${HOSTFILE:-}" ]; then
  HOSTFILE=$(mktemp)
  trap 'rm -f "$HOSTFILE"' EXIT
  echo "localhost slots=${NPROC:-2}" > "$HOSTFILE"
fi
args=(--hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29735}")
[ -n "${MASTER_ADDR:-}" ] && args+=(--master_addr "$MASTER_ADDR")
[ -n "${LAUNCHER:-}" ] && args+=(--launcher "$LAUNCHER")
deepspeed "${args[@]}" --module zclip_dist.deepspeed.launch "${SCRIPT:-examples/train_deepspeed.py}" "$@"
