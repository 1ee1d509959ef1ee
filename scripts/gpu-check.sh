#!/usr/bin/env bash
# Every GPU test plus a short GPU benchmark, on a machine with CUDA (under 5 minutes on one or two
# GPUs; pipeline checks need 2 and skip otherwise). Prints the numbers; exit code = pytest's.
#   bash scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
PY=.venv/bin/python
$PY - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s):",
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
PY
timeout 240 $PY -m pytest tests/gpu -q -rs
status=$?
timeout 120 $PY -m hispec.bench.gpu --max-new-tokens 64 --num-prompts 8
exit $status
