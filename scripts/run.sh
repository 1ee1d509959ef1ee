#!/usr/bin/env bash
# The README's main command: installs what it needs into .venv, then serves the bundled model:
# `serve run deploy/hispec.yaml` (HTTP on :8000, gRPC on :9000; Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/serve run deploy/hispec.yaml "$@"
