#!/usr/bin/env bash
# The README's main command: installs what it needs into .venv, then serves the bundled model:
# `serve run deploy/hispec.yaml` (HTTP on :8000, gRPC on :9000; Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# Serve's gRPC proxy takes messages up to 2 GiB by default; ours are prompts (RESOURCE_EXHAUSTED beyond).
export RAY_SERVE_GRPC_MAX_MESSAGE_SIZE=${RAY_SERVE_GRPC_MAX_MESSAGE_SIZE:-4194304}
exec .venv/bin/serve run deploy/hispec.yaml "$@"
