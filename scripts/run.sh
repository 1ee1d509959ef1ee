#!/usr/bin/env bash
# The README's main command: installs what it needs into .venv, then runs the main job.
# Until the Ray Serve application exists this is `hispec generate` on the bundled model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/hispec generate --prompt "def fibonacci(n):" --max-new-tokens 64 "$@"
