#!/usr/bin/env bash
# The test suite on a fresh machine: set-up, then every test (multi-rank ones on simulated gloo ranks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
bash launch/setup_megatron019.sh  # megatron-core 0.19.2 beside 0.16.1: the Megatron tests run on both
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
exec python3 -m pytest -q tests "$@"
