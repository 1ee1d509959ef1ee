"""`hispec generate`: continue prompts with a local early-exit checkpoint.

    hispec generate --prompt "def fibonacci(n):" --max-new-tokens 64
    hispec generate --prompts prompts.jsonl --json      # one {"prompt": ...} per line
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from hispec.model import load_model
from hispec.model.greedy import greedy_generate
from hispec.models import DEFAULT_MODEL


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    prompts = []
    for number, line in enumerate(Path(args.prompts).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise SystemExit(f"{args.prompts}:{number}: expected a JSON object with a string 'prompt'")
        prompts.append(record["prompt"])
    return prompts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hispec generate", description="Greedy generation with the full model.")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint directory (default: bundled)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompts", help="JSONL file, one {\"prompt\": ...} per line")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 0:
        raise SystemExit("--max-new-tokens must be >= 0")
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"no checkpoint at {args.model} (config.json missing)")
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = load_model(args.model, dtype=args.dtype)
    eos = set(model.config.eos_token_ids) | ({tokenizer.eos_token_id} - {None})
    for prompt in read_prompts(args):
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if args.json:
            token_ids, finish = greedy_generate(model, prompt_ids, args.max_new_tokens, tuple(eos))
            text = tokenizer.decode(token_ids, skip_special_tokens=True)
            print(json.dumps({"prompt": prompt, "text": text, "token_ids": token_ids, "finish_reason": finish}))
        else:
            sys.stdout.write(prompt)
            streamed: list[int] = []

            def show(token: int) -> None:
                # decode the whole continuation each time: byte-level BPE pieces may not be valid alone
                before = tokenizer.decode(streamed, skip_special_tokens=True)
                streamed.append(token)
                sys.stdout.write(tokenizer.decode(streamed, skip_special_tokens=True)[len(before):])
                sys.stdout.flush()

            _, finish = greedy_generate(model, prompt_ids, args.max_new_tokens, tuple(eos), on_token=show)
            sys.stdout.write(f"\n[finish_reason={finish}]\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
