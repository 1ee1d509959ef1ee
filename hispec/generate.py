"""`hispec generate`: continue prompts with a local early-exit checkpoint.

    hispec generate --prompt "def fibonacci(n):" --max-new-tokens 64
    hispec generate --method layerskip --exits 4 --budgets 4 --prompt "import os"
    hispec generate --temperature 0.8 --top-p 0.95 --seed 1 --prompts prompts.jsonl --json
    hispec generate --pipeline-stages 2 --prompt "import os"    # the layers split over 2 Ray actors

Defaults: the bundled model, its tuned HiSpec hierarchy (or exits at 1/8 and 1/4 depth with
budgets 2 and 4), greedy. All prompts of a file decode together in one batch (--max-batch-size).
With --pipeline-stages S > 1 the command starts a local Ray instance of its own, runs the model as
S stage actors driven from this process (hispec.pipeline), and shuts it down at the end; greedy
output is the same as in one process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from hispec.config import ModelConfig
from hispec.model import load_model
from hispec.models import DEFAULT_MODEL
from hispec.engine import EngineConfig, SpecEngine
from hispec.pipeline.build import check_num_stages
from hispec.speculation import Request, RequestStats, SamplingParams
from hispec.speculation.hierarchy import METHODS, BatchPolicy, resolve_policy
from hispec.speculation.request import cut_at_stop
from hispec.speculation.text import StreamingText


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    prompts = []
    for number, line in enumerate(Path(args.prompts).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SystemExit(f"{args.prompts}:{number}: not JSON ({error})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise SystemExit(f"{args.prompts}:{number}: expected a JSON object with a string 'prompt'")
        prompts.append(record["prompt"])
    if not prompts:
        raise SystemExit(f"{args.prompts}: no prompts")
    return prompts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hispec generate", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint directory (default: bundled)")
    parser.add_argument("--method", choices=(*METHODS, "auto"), default="hispec",
                        help="decoding method (default: hispec); auto: the tuned hierarchy for each batch size")
    parser.add_argument("--exits", type=int_list, help="exit layers E0[,E1..] below the last layer")
    parser.add_argument("--budgets", type=int_list, help="tokens per level N0[,N1..], one per exit")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompts", help="JSONL file, one {\"prompt\": ...} per line")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, help="sampling seed (each prompt uses it; default: random)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="weights; bfloat16 on CPU computes in float32 over bf16 weights (docs/runtime.md)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--compile", action="store_true", help="torch.compile the layer loop (slow start)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--pipeline-stages", type=int, default=1, metavar="S",
                        help="split the layers over S stage actors on a local Ray instance started for the "
                             "command (default 1: all layers in this process)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        parser.error(f"no checkpoint at {args.model} (config.json missing)")
    try:
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
        config = EngineConfig(max_batch_size=args.max_batch_size)
        if args.max_new_tokens < 0:
            raise ValueError("--max-new-tokens must be >= 0")
    except ValueError as error:
        parser.error(str(error))
    if args.pipeline_stages > 1 and args.compile:
        parser.error("--compile applies to the single-process engine (--pipeline-stages 1)")
    prompts = read_prompts(args)
    from transformers import AutoTokenizer

    try:
        policy = resolve_policy(args.method, ModelConfig.from_pretrained(args.model).num_layers, args.model,
                                args.exits, args.budgets)
    except ValueError as error:
        parser.error(str(error))
    try:
        check_num_stages(policy, args.pipeline_stages)
    except ValueError as error:
        parser.error(f"--pipeline-stages: {error}")
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def detokenize(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    stops = tuple(args.stop)
    requests = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        streamer = TextStreamer(detokenize, stops) if len(prompts) == 1 and not args.json else None
        try:
            requests.append(Request(ids, args.max_new_tokens, sampling, stop_strings=stops,
                                    on_tokens=streamer.push if streamer else None))
        except ValueError as error:
            parser.error(str(error))
    with open_engine(args, policy, config, detokenize) as engine:
        if len(prompts) == 1 and not args.json:
            sys.stdout.write(prompts[0])
        started = time.perf_counter()
        try:
            results = engine.generate(requests)
        except ValueError as error:  # e.g. a prompt longer than the context
            parser.error(str(error))
        elapsed = time.perf_counter() - started

    for prompt, request, result in zip(prompts, requests, results):
        text, _ = cut_at_stop(detokenize(result.token_ids), stops)
        if args.json:
            print(json.dumps({"prompt": prompt, "text": text, "token_ids": result.token_ids,
                              "finish_reason": result.finish_reason, "stats": result.stats.to_dict(result.hierarchy or policy.choose(1))}))
        elif request.on_tokens is not None:
            request.on_tokens.__self__.finish(text)
            print(f"\n[finish_reason={result.finish_reason}]")
        else:
            print(f"{prompt}{text}\n[finish_reason={result.finish_reason}]\n")
    if not args.json:
        for used in dict.fromkeys(r.hierarchy for r in results if r.hierarchy is not None):
            stats = RequestStats.total(used, [r.stats for r in results if r.hierarchy == used])
            print(summary(used, stats, elapsed), file=sys.stderr)
    return 0


@contextmanager
def open_engine(args: argparse.Namespace, policy: BatchPolicy, config: EngineConfig, detokenize) -> Iterator[SpecEngine]:
    """An engine over the whole model in this process or (--pipeline-stages S > 1) over S stage
    actors of a local Ray instance that lives as long as the engine."""
    if args.pipeline_stages == 1:
        model = load_model(args.model, dtype=args.dtype)
        if args.compile:
            model.compile_layers()
        yield SpecEngine(model, policy, config, detokenize=detokenize)
        return
    from hispec.pipeline.build import PipelinedEngine
    from hispec.pipeline.local import local_ray, stage_cpus

    with local_ray(stage_cpus(args.pipeline_stages)), PipelinedEngine.start(
            args.model, policy, args.pipeline_stages, config, dtype=args.dtype, detokenize=detokenize) as pipelined:
        yield pipelined.engine


def summary(hierarchy, stats: RequestStats, elapsed: float) -> str:
    report = stats.to_dict(hierarchy)
    rates = " ".join(f"L{lv['exit']}={lv['acceptance_rate']}" for lv in report["levels"][1:])
    return (f"[{report['hierarchy']}] {stats.new_tokens} tokens in {elapsed:.2f} s "
            f"({stats.new_tokens / max(elapsed, 1e-9):.1f} tok/s), {report['tokens_per_target_pass']} tokens/target pass"
            + (f", acceptance {rates}" if rates else ""))


class TextStreamer:
    """Writes committed text to stdout as it becomes stable."""

    def __init__(self, detokenize, stops: tuple[str, ...]) -> None:
        self.text = StreamingText(detokenize, stops)

    def push(self, new_tokens: list[int]) -> None:
        self._show(self.text.push(new_tokens))

    def finish(self, text: str) -> None:
        self._show(self.text.finish(text))

    @staticmethod
    def _show(piece: str) -> None:
        if piece:
            sys.stdout.write(piece)
            sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
