#!/usr/bin/env bash
# ZClip + DeepSpeed under mpirun. DeepSpeed's init_distributed finds rank and world size through mpi4py
# (`pip install mpi4py`, Open MPI: apt-get install openmpi-bin libopenmpi-dev) when RANK/WORLD_SIZE are
# unset; MASTER_ADDR comes from `hostname -I` and MASTER_PORT from the script's --distributed-port.
#
# Variables (all optional):
#   NPROC          ranks                                 (default 2)
#   HOSTS          mpirun -H value, e.g. node1:8,node2:8 (default: this machine)
#   MASTER_PORT    passed to the script as --distributed-port (default 29736)
#   SCRIPT         training script                       (default examples/train_deepspeed.py)
#   MPIRUN_ARGS    extra mpirun flags                    (default: --allow-run-as-root --oversubscribe)
#   DS_ACCELERATOR set to "cpu" to force the CPU accelerator; exported to every rank
set -euo pipefail
cd "$(dirname "$0")/.."
hosts=()
[ -n "${HOSTS:-}" ] && hosts=(-H "$HOSTS")
# shellcheck disable=SC2086
exec mpirun -np "${NPROC:-2}" "${hosts[@]}" ${MPIRUN_ARGS:---allow-run-as-root --oversubscribe} \
  -x PATH -x PYTHONPATH -x DS_ACCELERATOR \
  "${PYTHON:-python}" -m zclip_dist.deepspeed.launch "${SCRIPT:-examples/train_deepspeed.py}" \
  --distributed-port "${MASTER_PORT:-29736}" "$@"
