"""The README's client calls, copied out of the README and run as a user would (from the repo root)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def readme_client_calls() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Calling the server", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def test_the_readme_has_grpc_curl_and_openai_calls():
    calls = "\n".join(readme_client_calls())
    assert "curl" in calls and "HiSpecStub" in calls and "OpenAI(" in calls and '"stream": true' in calls


@pytest.mark.parametrize("index", range(4))
def test_readme_call_works(server, index):
    script = readme_client_calls()[index]
    # `.venv/bin/python` in the README is this interpreter when the suite runs from the README's command
    python = Path(os.sys.executable)
    script = script.replace(".venv/bin/python", str(python))
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert out.strip() and '"error":' not in out, out[:2000]  # a 4xx body is {"error": {...}}
    if "stream\": true" in script:
        assert out.rstrip().endswith("data: [DONE]")
