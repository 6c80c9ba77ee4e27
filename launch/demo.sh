#!/usr/bin/env bash
# The main job: set up this machine, then train a small GPT with DeepSpeed five times -- fixed clips 1, 2
# and 8, ZClip, AdaGC -- with a corrupted batch injected at a known step; prints the table, writes
# out/demo/demo.png. CPU: 4 simulated ranks over gloo. GPUs: one rank per GPU over NCCL.
#
# Variables (all optional):
#   PYTHON            interpreter (default python3)
#   ZCLIP_SKIP_SETUP  set to 1 to skip `bash launch/setup.sh` (already set up)
#   DS_ACCELERATOR    set to "cpu" to use simulated CPU ranks even when GPUs are present
# Arguments go to `zclip-dist demo`:  launch/demo.sh --short   |   launch/demo.sh --pilot   |   launch/demo.sh --world 2
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${ZCLIP_SKIP_SETUP:-0}" != 1 ]; then
  bash launch/setup.sh
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  export DS_ACCELERATOR=cpu  # DeepSpeed's CPU accelerator: gloo between the simulated ranks
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # ranks share the cores; one thread each avoids oversubscription
exec "$PY" -m zclip_dist.cli demo "$@"
