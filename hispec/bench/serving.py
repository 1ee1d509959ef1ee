"""`hispec bench-serve`: load a running server over gRPC streams; throughput and latency by concurrency.

    serve run deploy/hispec.yaml &            # or any deployment of the app
    hispec bench-serve --concurrency 1,8 --out docs/serving

Each of C concurrent streams sends its requests one after another (closed loop, greedy, the same
prompts at every concurrency). Levels are interleaved over repetitions (1, 8, 1, 8, ...);
throughput is the median over repetitions of all tokens / wall time, latencies are percentiles
over every request. Greedy outputs are checked to be identical at every concurrency (batching
must not change them). Writes DIR/serving.json and DIR/serving.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from hispec.bench.prompts import bundled_heldout_prompts, read_prompts_jsonl


@dataclass(frozen=True)
class Timing:
    prompt_index: int
    tokens: int
    ttft_s: float
    latency_s: float
    token_ids: tuple[int, ...]


async def _one(stub, pb, prompt_index: int, prompt: str, max_new_tokens: int) -> Timing:
    started = time.perf_counter()
    first = None
    ids: list[int] = []
    async for message in stub.GenerateStream(pb.GenerateRequest(prompt=prompt, max_new_tokens=max_new_tokens)):
        if first is None and message.token_ids:
            first = time.perf_counter()
        ids += message.token_ids
    done = time.perf_counter()
    return Timing(prompt_index, len(ids), (first or done) - started, done - started, tuple(ids))


async def run_level(target: str, prompts: list[str], concurrency: int, requests_per_stream: int,
                    max_new_tokens: int, progress: tqdm) -> tuple[float, list[Timing]]:
    """Returns (aggregate tokens/s, per-request timings) for one concurrency level."""
    import grpc

    from hispec.rpc import hispec_pb2 as pb
    from hispec.rpc import hispec_pb2_grpc as rpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = rpc.HiSpecStub(channel)
        timings: list[Timing] = []

        async def stream(worker: int) -> None:
            for n in range(requests_per_stream):
                index = (worker * requests_per_stream + n) % len(prompts)
                timings.append(await _one(stub, pb, index, prompts[index], max_new_tokens))
                progress.update(1)

        started = time.perf_counter()
        await asyncio.gather(*(stream(w) for w in range(concurrency)))
        wall = time.perf_counter() - started
    return sum(t.tokens for t in timings) / wall, timings


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summarize(levels: dict[int, list[tuple[float, list[Timing]]]]) -> dict:
    out = {}
    for concurrency, runs in levels.items():
        timings = [t for _, ts in runs for t in ts]
        latencies, ttfts = [t.latency_s for t in timings], [t.ttft_s for t in timings]
        out[str(concurrency)] = {
            "tokens_per_s": round(statistics.median(rate for rate, _ in runs), 1),
            "tokens_per_s_runs": [round(rate, 1) for rate, _ in runs],
            "requests": len(timings),
            "latency_p50_s": round(percentile(latencies, 50), 3), "latency_p99_s": round(percentile(latencies, 99), 3),
            "ttft_p50_s": round(percentile(ttfts, 50), 3), "ttft_p99_s": round(percentile(ttfts, 99), 3),
            "per_stream_tokens_per_s": round(statistics.median(t.tokens / t.latency_s for t in timings), 1),
        }
    return out


def outputs_agree(levels: dict[int, list[tuple[float, list[Timing]]]]) -> bool:
    """Greedy: every request for a prompt produced the same tokens, at every concurrency."""
    seen: dict[int, tuple[int, ...]] = {}
    for runs in levels.values():
        for _, timings in runs:
            for t in timings:
                if seen.setdefault(t.prompt_index, t.token_ids) != t.token_ids:
                    return False
    return True


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = results["levels"]
    names = list(levels)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    bars = left.bar([f"{c} stream{'s' if c != '1' else ''}" for c in names], [levels[c]["tokens_per_s"] for c in names],
                    color="#4c72b0")
    left.bar_label(bars, fmt="%.0f")
    left.set_ylabel("aggregate tokens / s (median)")
    left.set_title(f"gRPC GenerateStream, {results['config']['max_new_tokens']} new tokens, greedy", fontsize=9)
    x = range(len(names))
    for key, label in (("latency_p50_s", "latency p50"), ("latency_p99_s", "latency p99"),
                       ("ttft_p50_s", "TTFT p50"), ("ttft_p99_s", "TTFT p99")):
        right.plot(list(x), [levels[c][key] for c in names], marker="o", label=label)
    right.set_xticks(list(x), names)
    right.set_xlabel("concurrent streams")
    right.set_ylabel("seconds")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hispec bench-serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="localhost:9000", help="gRPC address of the Serve proxy")
    parser.add_argument("--prompts", type=Path, help="JSONL with a 'prompt' field per line (default: bundled held-out)")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated stream counts")
    parser.add_argument("--requests-per-stream", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="requests sent first, not measured")
    parser.add_argument("--out", type=Path, help="directory for serving.json and serving.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.prompts:
        prompts = read_prompts_jsonl(args.prompts)
    else:
        prompts = bundled_heldout_prompts()
    total = args.warmup + args.repeats * args.requests_per_stream * sum(concurrency)
    levels: dict[int, list[tuple[float, list[Timing]]]] = {c: [] for c in concurrency}
    with tqdm(total=total, desc="requests", file=sys.stderr) as progress:
        asyncio.run(run_level(args.target, prompts, 1, args.warmup, args.max_new_tokens, progress))
        for _ in range(args.repeats):
            for c in concurrency:
                levels[c].append(asyncio.run(run_level(args.target, prompts, c, args.requests_per_stream,
                                                       args.max_new_tokens, progress)))
    results = {
        "config": {"target": args.target, "concurrency": concurrency, "requests_per_stream": args.requests_per_stream,
                   "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "prompts": len(prompts)},
        "levels": summarize(levels),
        "outputs_identical_across_concurrency": outputs_agree(levels),
    }
    base = str(concurrency[0])
    results["speedup_over_" + base] = {str(c): round(results["levels"][str(c)]["tokens_per_s"] /
                                                     results["levels"][base]["tokens_per_s"], 2) for c in concurrency}
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serving.json").write_text(json.dumps(results, indent=1) + "\n")
        plot(results, args.out / "serving.png")
        print(f"wrote {args.out / 'serving.json'} and serving.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
