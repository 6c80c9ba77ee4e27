#!/usr/bin/env bash
# Natural instability, nothing injected: set up this machine, then sweep learning rate x clipping method
# (none, fixed tight, fixed loose, ZClip, AdaGC) x seed on a small GPT; prints the tables, writes
# out/sweep/{table.md,sweep.png,curves.png,results.json,traces.json}.
# CPU (default): 60 runs of 1,000 steps, one process per core.
# GPU variant:   launch/sweep.sh --device cuda --size large   (after its pilot: --pilot --device cuda --size large,
#                then pass --tight-clip and --loose-clip from the typical norm it prints)
#
# Variables (all optional):
#   PYTHON            interpreter (default python3)
#   ZCLIP_SKIP_SETUP  set to 1 to skip `bash launch/setup.sh` (already set up)
# Arguments go to `zclip-dist sweep`:  launch/sweep.sh --short   |   launch/sweep.sh --pilot
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${ZCLIP_SKIP_SETUP:-0}" != 1 ]; then
  bash launch/setup.sh
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one run per core, one thread each
exec "$PY" -m zclip_dist.cli sweep "$@"
