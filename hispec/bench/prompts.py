"""Held-out prompts for the bundled model: code from the stdlib files its training never saw.

    python -m hispec.bench.prompts            # rewrites the bundled model's heldout_prompts.jsonl

Each prompt is a few lines of context ending with a `def` / `class` line of a held-out file, so
the continuation is the body the model has to write. Files are visited round-robin, so every
held-out file contributes; the result is deterministic.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hispec.models import DEFAULT_MODEL

PROMPTS_NAME = "heldout_prompts.jsonl"


def prompts_from_files(files: list[Path], count: int, context_lines: int = 6, max_chars: int = 400) -> list[str]:
    per_file = []
    for path in files:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        starts = [i for i, line in enumerate(lines) if line.lstrip().startswith(("def ", "class "))]
        per_file.append([
            "\n".join(lines[max(0, i - context_lines) : i + 1])[-max_chars:] + "\n" for i in starts
        ])
    prompts, seen, depth = [], set(), 0
    while len(prompts) < count and any(depth < len(p) for p in per_file):
        for candidates in per_file:
            if depth < len(candidates) and candidates[depth] not in seen and len(prompts) < count:
                seen.add(candidates[depth])
                prompts.append(candidates[depth])
        depth += 1
    return prompts


def read_prompts_jsonl(path: Path) -> list[str]:
    """The "prompt" of every non-empty line of a JSONL file."""
    return [json.loads(line)["prompt"] for line in Path(path).read_text().splitlines() if line.strip()]


def bundled_heldout_prompts(model_dir: Path = DEFAULT_MODEL) -> list[str]:
    return read_prompts_jsonl(Path(model_dir) / PROMPTS_NAME)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--count", type=int, default=64)
    args = parser.parse_args(argv)
    from hispec.train.data import stdlib_root  # imports torch: only this command needs it

    split = json.loads((args.model / "data_split.json").read_text())
    files = [stdlib_root() / name for name in split["heldout"]]
    prompts = prompts_from_files(files, args.count)
    with open(args.model / PROMPTS_NAME, "w") as out:
        for prompt in prompts:
            out.write(json.dumps({"prompt": prompt}) + "\n")
    print(f"wrote {len(prompts)} prompts from {len(files)} held-out files to {args.model / PROMPTS_NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
