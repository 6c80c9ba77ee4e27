#!/usr/bin/env bash
# A second Python environment with megatron-core 0.19.2, the newest supported release, for the tests that
# run Megatron on both ends of the supported range (the main environment keeps megatron-core 0.16.1, the
# newest release that installs on Python 3.11). Run after launch/setup.sh; idempotent.
#
# megatron-core 0.17+ declares Requires-Python >= 3.12, but its wheel runs on 3.11 (the tests add the one
# 3.12 name Megatron-LM core_v0.19.0 imports, typing.override). The environment sees the main one's
# packages (torch==2.13.0, numpy<2.5, megatron.training's dependencies) and overrides only megatron-core.
# Variables:
#   ZCLIP_MEGATRON019_VENV  where to create it (default .venv-megatron019 in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${ZCLIP_MEGATRON019_VENV:-.venv-megatron019}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --ignore-requires-python "megatron-core==0.19.2"
"$VENV/bin/python" -c 'import importlib.metadata as m; v = m.version("megatron-core"); assert v == "0.19.2", v'
