#!/usr/bin/env bash
# The README's main command: installs what it needs into .venv, then serves the bundled model:
# `serve run deploy/hispec.yaml` (HTTP on :8000, gRPC on :9000; Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# Serve's gRPC proxy takes messages up to 2 GiB by default; ours are prompts (RESOURCE_EXHAUSTED beyond).
export RAY_SERVE_GRPC_MAX_MESSAGE_SIZE=${RAY_SERVE_GRPC_MAX_MESSAGE_SIZE:-4194304}
# Ray starts its workers (the replicas, and the engine process they spawn) at nice 15: any ordinary
# process would take the CPU from the server. Serving is what this machine is for.
export RAY_worker_niceness=${RAY_worker_niceness:-0}
exec .venv/bin/serve run deploy/hispec.yaml "$@"
