#!/usr/bin/env bash
# Set up a development environment from nothing: a virtualenv in .venv with the project
# installed (compat editable mode, so Hydra discovers the launcher plugin) and every extra.
#
# torch is installed FIRST and pinned to 2.13.0: on our machines that version is a CPU wheel
# lying on disk, while a bare "torch" (pulled in by lightning/transformers) would download a
# multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet --config-settings editable_mode=compat -e ".[all,test,dev]"
echo "bootstrap: environment ready in .venv" >&2
