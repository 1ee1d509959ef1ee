"""A copy of the bundled checkpoint with a 4,096-token context and no end-of-sequence token, for tests
that need long prompts (chunked prefill) or requests that surely run for seconds (cancellation).

Same weights: rotary position embeddings have no learned positions, so the model runs past the 512
positions it was trained on (its text gets worse there, which these tests do not look at); with no
EOS a request runs until its max_new_tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hispec.models import DEFAULT_MODEL

LONG_CONTEXT = 4096


def long_context_checkpoint(directory: Path) -> Path:
    target = directory / "hispec-stdlib-ee-4k"
    shutil.copytree(DEFAULT_MODEL, target, ignore=shutil.ignore_patterns("*.png", "tuning", "metrics.jsonl"))
    for name in ("config.json", "generation_config.json"):
        path = target / name
        if path.is_file():
            config = json.loads(path.read_text())
            config["eos_token_id"] = None
            if name == "config.json":
                config["max_position_embeddings"] = LONG_CONTEXT
            path.write_text(json.dumps(config, indent=2))
    return target
