#!/usr/bin/env bash
# Creates .venv and installs hispec into it (idempotent; the README's two commands call this).
# torch is installed first and pinned to 2.13.0: on these machines that is the CPU wheel on disk,
# and asking for it explicitly keeps any resolver from pulling a multi-GB CUDA build.
# Then builds the C++ layer stack for this machine (every time: a cache hit, ~1 s, once built).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.hispec-installed
if ! { [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; }; then
    [ -x .venv/bin/python ] || "$PY" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    touch "$stamp"
fi
# Built here, at install time, not at a replica's first request (about 40 s the first time on a
# 2-core CPU), into .venv/hispec-native, keyed by sources + compiler + CPU + flags + torch. If it
# does not build, this script fails, and with it run.sh and test.sh (CI). HISPEC_NATIVE=0 is the
# deliberate choice of the Python layer loop: nothing to build.
if [ "${HISPEC_NATIVE:-1}" = 0 ]; then
    echo "HISPEC_NATIVE=0: not building the C++ layer stack (decoder layers run in Python)"
else
    .venv/bin/python -m hispec.model.native build
fi
