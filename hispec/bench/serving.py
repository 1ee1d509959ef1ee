"""`hispec bench-serve`: load a running server over gRPC streams; throughput and latency by concurrency.

    serve run deploy/hispec.yaml &            # or any deployment of the app
    hispec bench-serve --concurrency 1,8 --out docs/serving

Each of C concurrent streams sends requests one after another (closed loop, greedy, prompts taken
in order from the same list at every concurrency) for the whole run of a level. Throughput is
steady-state: the tokens received inside a measurement window (after a ramp-up, before the
streams are cancelled) divided by its length, i.e. with all C streams in flight the whole time;
requests still running when the window closes are cancelled. Levels are interleaved over
repetitions (1, 8, 1, 8, ...) and the median reported; latencies are percentiles over every
request that finished. Greedy outputs are checked to be identical at every concurrency (batching
must not change them). Writes DIR/serving.json and DIR/serving.png.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from hispec.bench.clients import grpc_channel, grpc_stream
from hispec.bench.latency import percentile
from hispec.bench.prompts import bundled_heldout_prompts, read_prompts_jsonl


@dataclass(frozen=True)
class Timing:
    """One finished request."""

    prompt_index: int
    tokens: int
    ttft_s: float
    latency_s: float
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class LevelRun:
    tokens_per_s: float  # tokens received inside the window / its length
    timings: list[Timing]  # requests that finished (inside the window or not)


def tokens_in_window(arrivals: list[tuple[float, int]], start: float, end: float) -> int:
    """Tokens of the (time received, count) messages that arrived in [start, end)."""
    return sum(count for at, count in arrivals if start <= at < end)


async def _one(stub, pb, prompt_index: int, prompt: str, max_new_tokens: int,
               arrivals: list[tuple[float, int]], metadata: tuple = ()) -> Timing:
    reply = await grpc_stream(stub, pb.GenerateRequest(prompt=prompt, max_new_tokens=max_new_tokens), metadata,
                              on_output=lambda now, ids: arrivals.append((now, len(ids))))
    return Timing(prompt_index, len(reply.token_ids), reply.ttft_s, reply.latency_s, reply.token_ids)


async def run_level(target: str, prompts: list[str], concurrency: int, ramp_s: float, duration_s: float,
                    max_new_tokens: int, app: str | None = None) -> LevelRun:
    """C closed-loop streams for ramp_s + duration_s; throughput over the last duration_s. `app`:
    the Serve application to call (gRPC metadata `application`), when the proxy serves several."""
    metadata = (("application", app),) if app else ()
    from hispec.rpc import hispec_pb2 as pb
    from hispec.rpc import hispec_pb2_grpc as rpc

    arrivals: list[tuple[float, int]] = []
    timings: list[Timing] = []
    next_prompt = itertools.count()
    async with grpc_channel(target) as channel:
        stub = rpc.HiSpecStub(channel)

        async def stream() -> None:
            while True:
                index = next(next_prompt) % len(prompts)
                timings.append(await _one(stub, pb, index, prompts[index], max_new_tokens, arrivals, metadata))

        started = time.perf_counter()
        tasks = [asyncio.create_task(stream()) for _ in range(concurrency)]
        await asyncio.sleep(ramp_s + duration_s)
        for task in tasks:  # cancels the streams in flight (the server aborts them)
            task.cancel()
        errors = [r for r in await asyncio.gather(*tasks, return_exceptions=True) if isinstance(r, Exception)]
        if errors:  # a request failed before the window closed
            raise errors[0]
    window_start = started + ramp_s
    tokens = tokens_in_window(arrivals, window_start, window_start + duration_s)
    return LevelRun(tokens / duration_s, timings)


def summarize(levels: dict[int, list[LevelRun]]) -> dict:
    out = {}
    for concurrency, runs in levels.items():
        timings = [t for run in runs for t in run.timings]
        latencies, ttfts = [t.latency_s for t in timings], [t.ttft_s for t in timings]
        out[str(concurrency)] = {
            "tokens_per_s": round(statistics.median(run.tokens_per_s for run in runs), 1),
            "tokens_per_s_runs": [round(run.tokens_per_s, 1) for run in runs],
            "requests": len(timings),
            "latency_p50_s": round(percentile(latencies, 50), 3), "latency_p99_s": round(percentile(latencies, 99), 3),
            "ttft_p50_s": round(percentile(ttfts, 50), 3), "ttft_p99_s": round(percentile(ttfts, 99), 3),
            "per_stream_tokens_per_s": round(statistics.median(t.tokens / t.latency_s for t in timings), 1),
        }
    return out


def outputs_agree(*levels: dict[int, list[LevelRun]]) -> bool:
    """Greedy: every request for a prompt produced the same tokens, at every concurrency (and in
    every application given: a pipelined server must answer what a single-process one does)."""
    seen: dict[int, tuple[int, ...]] = {}
    for by_level in levels:
        for runs in by_level.values():
            for run in runs:
                for t in run.timings:
                    if seen.setdefault(t.prompt_index, t.token_ids) != t.token_ids:
                        return False
    return True


def plot(results: dict, path: Path) -> None:
    """Left: tokens/s by concurrency (a bar per application); right: latency and TTFT percentiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_app = results["apps"] if "apps" in results else {"": results}
    names = [str(c) for c in results["config"]["concurrency"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(by_app)
    for i, (app, entry) in enumerate(by_app.items()):
        levels = entry["levels"]
        bars = left.bar([x + i * width for x in range(len(names))], [levels[c]["tokens_per_s"] for c in names],
                        width, label=app or None)
        left.bar_label(bars, fmt="%.0f", fontsize=7)
        for key, label, style in (("latency_p50_s", "latency p50", "-"), ("latency_p99_s", "latency p99", "--"),
                                  ("ttft_p50_s", "TTFT p50", ":")):
            right.plot(range(len(names)), [levels[c][key] for c in names], style, marker="o",
                       label=f"{app}: {label}" if app else label)
    left.set_xticks([x + width * (len(by_app) - 1) / 2 for x in range(len(names))],
                    [f"{c} stream{'s' if c != '1' else ''}" for c in names])
    left.set_ylabel("aggregate tokens / s (median)")
    left.set_title(f"gRPC GenerateStream, {results['config']['max_new_tokens']} new tokens, greedy", fontsize=9)
    if len(by_app) > 1:
        left.legend(fontsize=8)
    right.set_xticks(range(len(names)), names)
    right.set_xlabel("concurrent streams")
    right.set_ylabel("seconds")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hispec bench-serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="localhost:9000", help="gRPC address of the Serve proxy")
    parser.add_argument("--prompts", type=Path, help="JSONL with a 'prompt' field per line (default: bundled held-out)")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated stream counts")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per level and repeat")
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds each level runs before its window opens")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of one stream first, not measured")
    parser.add_argument("--apps", default="", help="comma-separated Serve application names to compare in one run "
                        "(gRPC metadata `application`; levels interleaved over them), e.g. hispec,hispec-pp2 with "
                        "deploy/hispec-compare.yaml; default: the proxy's only application")
    parser.add_argument("--out", type=Path, help="directory for serving.json and serving.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.prompts:
        prompts = read_prompts_jsonl(args.prompts)
    else:
        prompts = bundled_heldout_prompts()
    if args.duration <= 0 or args.ramp < 0 or args.warmup < 0 or args.repeats < 1 or min(concurrency) < 1:
        raise SystemExit("bench-serve: --duration must be > 0, --ramp/--warmup >= 0, --repeats and concurrency >= 1")
    apps = [a for a in args.apps.split(",") if a] or [None]
    levels: dict[str | None, dict[int, list[LevelRun]]] = {app: {c: [] for c in concurrency} for app in apps}
    if args.warmup:
        for app in apps:
            asyncio.run(run_level(args.target, prompts, 1, 0.0, args.warmup, args.max_new_tokens, app))
    with tqdm(total=args.repeats * len(concurrency) * len(apps), desc="levels", file=sys.stderr) as progress:
        for _ in range(args.repeats):
            for c in concurrency:
                for app in apps:
                    run = asyncio.run(run_level(args.target, prompts, c, args.ramp, args.duration, args.max_new_tokens, app))
                    levels[app][c].append(run)
                    progress.set_postfix_str(f"{app + ': ' if app else ''}{c} streams: {run.tokens_per_s:.0f} tok/s")
                    progress.update(1)
    config = {"target": args.target, "concurrency": concurrency, "ramp_s": args.ramp, "duration_s": args.duration,
              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "prompts": len(prompts)}
    per_app = {app: _app_results(levels[app], concurrency) for app in apps}
    if apps == [None]:
        results = {"config": config} | per_app[None]
    else:
        first = apps[0]
        results = {"config": config | {"apps": apps}, "apps": per_app,
                   "outputs_identical_across_apps_and_concurrency": outputs_agree(*levels.values()),
                   f"tokens_per_s_over_{first}": {app: {str(c): round(per_app[app]["levels"][str(c)]["tokens_per_s"] /
                                                                      per_app[first]["levels"][str(c)]["tokens_per_s"], 2)
                                                        for c in concurrency} for app in apps}}
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serving.json").write_text(json.dumps(results, indent=1) + "\n")
        plot(results, args.out / "serving.png")
        print(f"wrote {args.out / 'serving.json'} and serving.png", file=sys.stderr)
    return 0


def _app_results(levels: dict[int, list[LevelRun]], concurrency: list[int]) -> dict:
    out = {"levels": summarize(levels), "outputs_identical_across_concurrency": outputs_agree(levels)}
    base = str(concurrency[0])
    out["speedup_over_" + base] = {str(c): round(out["levels"][str(c)]["tokens_per_s"] /
                                                 out["levels"][base]["tokens_per_s"], 2) for c in concurrency}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
