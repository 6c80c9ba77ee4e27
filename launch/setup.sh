#!/usr/bin/env bash
# One-time set-up on a fresh machine: system MPI, the pinned torch, zclip_dist with every extra.
# Idempotent: re-running it installs nothing new. Variables:
#   ZCLIP_TORCH   torch requirement to install first (default torch==2.13.0; pin it: an unpinned torch
#                 pulls a multi-GB CUDA build on machines that have a local CPU wheel)
#   ZCLIP_EXTRAS  extras of zclip-dist to install (default deepspeed,megatron,lightning,test)
#   ZCLIP_NO_APT  set to 1 to skip apt-get (MPI launch tests then skip)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${ZCLIP_NO_APT:-0}" != 1 ] && ! command -v mpirun >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openmpi-bin libopenmpi-dev >/dev/null
  else
    echo "setup: no root apt-get; install Open MPI yourself for the mpirun launcher (tests skip it)" >&2
  fi
fi

"$PY" -m pip install -q --disable-pip-version-check "${ZCLIP_TORCH:-torch==2.13.0}"
"$PY" -m pip install -q --disable-pip-version-check -e ".[${ZCLIP_EXTRAS:-deepspeed,megatron,lightning,test}]"
if command -v mpicc >/dev/null 2>&1; then
  "$PY" -m pip install -q --disable-pip-version-check mpi4py
fi
