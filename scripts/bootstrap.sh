#!/usr/bin/env bash
# Creates .venv and installs hispec into it (idempotent; the README's two commands call this).
# torch is installed first and pinned to 2.13.0: on these machines that is the CPU wheel on disk,
# and asking for it explicitly keeps any resolver from pulling a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.hispec-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
    exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
touch "$stamp"
