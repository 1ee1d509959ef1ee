#!/usr/bin/env bash
# The README's test command: installs what it needs into .venv, then runs the whole suite.
# pytest's exit code 5 ("no tests collected") is a failure here, like any non-zero code.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest tests -q "$@"
