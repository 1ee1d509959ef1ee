"""`hispec loadtest`: a bounded load on a server on this machine, over gRPC and HTTP, unary and streaming.

    serve run deploy/hispec.yaml &
    hispec loadtest --requests 200 --concurrency 16 --max-tokens 8,32,128 --out docs/reliability

Sends a fixed number of requests (--requests) from C concurrent workers (--concurrency; each
sends its next request when the previous one ends), each request's kind drawn from --mix
(`grpc-stream`, `grpc-unary`, `http-stream`, `http-unary` with weights; default all four evenly)
and its length from --max-tokens; prompts are the bundled model's held-out prompts (or --prompts
JSONL; --distinct-prompts K: the first K) in order. After --time-limit seconds it stops issuing,
cancels what is in flight (the server aborts those) and counts them. Targets must be loopback
addresses: this is a load generator, not a client.

Reports (stdout and DIR/loadtest.json; DIR/loadtest.png plots it): requests ok, failed by code
(gRPC status names, HTTP status codes), cancelled and not issued; throughput (requests/s,
tokens/s); latency p50/p95/p99 by kind; time to first output, time per output token and the gap
between messages for streams; with greedy decoding, whether every output of a prompt is a prefix
of its longest (batching, protocol and length must not change a greedy completion); and the
resident memory of the server's processes before, during and after (hispec.bench.server_memory).
Exits 0 unless --fail-on-error is given and a request failed (cancelled ones are not failures).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

from hispec.bench import clients
from hispec.bench.clients import Reply, RequestFailed
from hispec.bench.loadtest_report import plot, report
from hispec.bench.prompts import bundled_heldout_prompts, read_prompts_jsonl
from hispec.bench.server_memory import ServerProcesses, Snapshot, find_server

KINDS = ("grpc-stream", "grpc-unary", "http-stream", "http-unary")
RSS_SAMPLE_S = 1.0


# ---- configuration, validated once ---------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    host: str
    port: int

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # any other name: not resolved, refused
            return False


def http_target(url: str) -> Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--http {url!r}: expected a URL like http://127.0.0.1:8000")
    return Target(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))


def grpc_target(address: str) -> Target:
    try:
        parts = urlsplit(f"//{address}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or port is None:
        raise ValueError(f"--grpc {address!r}: expected HOST:PORT like 127.0.0.1:9000 or [::1]:9000")
    return Target(host, port)


def parse_mix(text: str) -> dict[str, float]:
    """"grpc-stream=3,http-unary=1" (a name alone weighs 1) -> {kind: weight}, weights > 0."""
    mix = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = item.partition("=")
        if name not in KINDS:
            raise ValueError(f"--mix: unknown kind {name!r} (kinds: {', '.join(KINDS)})")
        mix[name] = float(weight) if weight else 1.0
        if not mix[name] > 0:
            raise ValueError(f"--mix: the weight of {name} must be > 0")
    if not mix:
        raise ValueError("--mix: no kinds given")
    return mix


@dataclass(frozen=True)
class LoadConfig:
    http_url: str
    grpc_address: str
    requests: int
    concurrency: int
    time_limit_s: float
    mix: dict[str, float]
    max_tokens: tuple[int, ...]
    temperature: float  # 0: greedy
    seed: int
    api_key: str | None = field(default=None, repr=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def describe(self, prompts_from: str, prompt_count: int) -> dict:
        return {"http": self.http_url, "grpc": self.grpc_address, "requests": self.requests,
                "concurrency": self.concurrency, "time_limit_s": self.time_limit_s, "mix": self.mix,
                "max_tokens": list(self.max_tokens), "temperature": self.temperature, "seed": self.seed,
                "api_key": self.api_key is not None, "prompts": prompts_from, "prompt_count": prompt_count}


# ---- the plan: which request, in which order -------------------------------------------------------
@dataclass(frozen=True)
class Planned:
    index: int
    kind: str
    prompt_index: int
    max_tokens: int


def make_plan(config: LoadConfig, prompt_count: int) -> list[Planned]:
    """Kinds and lengths drawn with `seed`; prompts in order, wrapping around."""
    rng = random.Random(config.seed)
    kinds, weights = list(config.mix), list(config.mix.values())
    return [Planned(i, rng.choices(kinds, weights)[0], i % prompt_count, rng.choice(config.max_tokens))
            for i in range(config.requests)]


@dataclass(frozen=True)
class Outcome:
    planned: Planned
    issued_at: float  # perf_counter
    reply: Reply | None = None  # set when it completed
    error: RequestFailed | None = None  # set when it failed
    cancelled: bool = False  # in flight at the time limit


# ---- running it ------------------------------------------------------------------------------------
class Sender:
    """Sends one planned request over its protocol and mode."""

    def __init__(self, config: LoadConfig, prompts: list[str], grpc_stub, session,
                 on_output: clients.OnOutput) -> None:
        from hispec.rpc import hispec_pb2 as pb

        self.pb, self.config, self.prompts = pb, config, prompts
        self.stub, self.session, self.on_output = grpc_stub, session, on_output
        key = config.api_key
        self.metadata = (("authorization", f"Bearer {key}"),) if key else ()
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def _sampling(self, planned: Planned) -> dict:
        if self.config.greedy:
            return {"temperature": 0.0}
        return {"temperature": self.config.temperature, "seed": self.config.seed + planned.index}

    async def send(self, planned: Planned) -> Reply:
        prompt, sampling = self.prompts[planned.prompt_index], self._sampling(planned)
        protocol, mode = planned.kind.split("-")
        if protocol == "grpc":
            request = self.pb.GenerateRequest(prompt=prompt, max_new_tokens=planned.max_tokens, **sampling)
            call = clients.grpc_stream if mode == "stream" else clients.grpc_unary
            return await call(self.stub, request, self.metadata, self.on_output)
        body = {"prompt": prompt, "max_tokens": planned.max_tokens, **sampling}
        call = clients.http_stream if mode == "stream" else clients.http_unary
        return await call(self.session, self.config.http_url, body, self.headers, self.on_output)


@dataclass
class Run:
    """What one load run saw (times are perf_counter)."""

    started: float
    ended: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (when, tokens) of every message
    rss: list[tuple[float, int]] = field(default_factory=list)  # (when, server RSS bytes)


async def _sample_rss(server: ServerProcesses, run: Run) -> None:
    while True:
        snapshot = await asyncio.to_thread(server.snapshot)
        run.rss.append((time.perf_counter(), snapshot.total_bytes))
        await asyncio.sleep(RSS_SAMPLE_S)


async def run_load(config: LoadConfig, prompts: list[str], plan: list[Planned], server: ServerProcesses,
                   progress: tqdm) -> Run:
    """`concurrency` workers take the plan in order until it is done or the time limit passes."""
    from hispec.rpc import hispec_pb2_grpc as rpc

    run = Run(started=time.perf_counter())
    todo = iter(plan)
    failures = 0
    async with clients.grpc_channel(config.grpc_address) as channel, \
            clients.http_session(config.concurrency) as session:
        sender = Sender(config, prompts, rpc.HiSpecStub(channel), session,
                        on_output=lambda now, ids: run.arrivals.append((now, len(ids))))

        async def worker() -> None:
            nonlocal failures
            for planned in todo:  # one iterator shared by all workers: each request is sent once
                issued = time.perf_counter()
                try:
                    outcome = Outcome(planned, issued, reply=await sender.send(planned))
                except RequestFailed as error:
                    outcome = Outcome(planned, issued, error=error)
                except asyncio.CancelledError:
                    run.outcomes.append(Outcome(planned, issued, cancelled=True))
                    raise
                except Exception as error:  # a client-side fault: counted under its name, the run goes on
                    outcome = Outcome(planned, issued, error=RequestFailed(planned.kind.split("-")[0],
                                                                           type(error).__name__, str(error)))
                run.outcomes.append(outcome)
                failures += outcome.error is not None
                progress.set_postfix_str(f"failed {failures}", refresh=False)
                progress.update(1)

        sampler = asyncio.create_task(_sample_rss(server, run))
        workers = [asyncio.create_task(worker()) for _ in range(config.concurrency)]
        _, late = await asyncio.wait(workers, timeout=config.time_limit_s)
        for task in late:  # the time limit: stop issuing, cancel what is in flight
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        run.ended = time.perf_counter()
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    return run


# ---- command line ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hispec loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--http", default="http://127.0.0.1:8000", help="base URL of the HTTP API (loopback)")
    parser.add_argument("--grpc", default="127.0.0.1:9000", help="HOST:PORT of the gRPC API (loopback)")
    parser.add_argument("--requests", type=int, default=100, help="requests to send in all")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--time-limit", type=float, default=300.0,
                        help="seconds; then stop issuing and cancel what is in flight")
    parser.add_argument("--mix", default=",".join(KINDS),
                        help=f"kinds with weights, e.g. grpc-stream=3,http-unary=1 (kinds: {', '.join(KINDS)})")
    parser.add_argument("--max-tokens", default="8,32,128", help="comma-separated lengths, drawn evenly per request")
    parser.add_argument("--prompts", type=Path, help="JSONL with a 'prompt' field per line (default: bundled held-out)")
    parser.add_argument("--distinct-prompts", type=int,
                        help="use only the first K prompts (repeats let greedy outputs be compared)")
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    sampling.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (> 0)")
    parser.add_argument("--seed", type=int, default=0, help="draws the plan; sampled requests use seed + index")
    parser.add_argument("--api-key", default=os.environ.get("HISPEC_API_KEY"),
                        help="sent as `Authorization: Bearer KEY` (HTTP) and `authorization` metadata (gRPC); "
                             "default $HISPEC_API_KEY")
    parser.add_argument("--server-pid", type=int,
                        help="root process of the server (e.g. `serve run`) whose memory to report; default: "
                             "the Ray node listening on the target ports")
    parser.add_argument("--out", type=Path, help="directory for loadtest.json and loadtest.png")
    parser.add_argument("--fail-on-error", action="store_true", help="exit 1 if any request failed")
    return parser


def config_from(args: argparse.Namespace) -> LoadConfig:
    targets = {"--http": http_target(args.http), "--grpc": grpc_target(args.grpc)}
    for option, target in targets.items():
        if not target.loopback:
            raise ValueError(f"{option}: refusing {target.host!r}: not a loopback address (127.0.0.0/8, ::1, "
                             "localhost). hispec loadtest only loads a server on this machine.")
    max_tokens = tuple(int(n) for n in args.max_tokens.split(",") if n.strip())
    if not max_tokens or min(max_tokens) < 1:
        raise ValueError("--max-tokens: give lengths >= 1, e.g. 8,32,128")
    if args.requests < 1 or args.concurrency < 1 or not args.time_limit > 0 or args.temperature < 0:
        raise ValueError("--requests and --concurrency must be >= 1, --time-limit > 0, --temperature >= 0")
    return LoadConfig(args.http, args.grpc, args.requests, args.concurrency, args.time_limit, parse_mix(args.mix),
                      max_tokens, args.temperature, args.seed, args.api_key or None)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from(args)
        server = find_server(args.server_pid, [http_target(config.http_url).port,
                                               grpc_target(config.grpc_address).port])
    except ValueError as error:
        parser.error(str(error))
    prompts = read_prompts_jsonl(args.prompts) if args.prompts else bundled_heldout_prompts()
    if args.distinct_prompts is not None:
        if args.distinct_prompts < 1:
            parser.error("--distinct-prompts must be >= 1")
        prompts = prompts[:args.distinct_prompts]
    if not prompts:
        parser.error("--prompts: no prompts in the file")
    plan = make_plan(config, len(prompts))

    print(f"loadtest: server memory from {server.how}", file=sys.stderr)
    load_before = os.getloadavg()
    before = server.snapshot()
    with tqdm(total=len(plan), desc="requests", file=sys.stderr) as progress:
        run = asyncio.run(run_load(config, prompts, plan, server, progress))
    after: Snapshot = server.snapshot()
    results = report(config.describe(str(args.prompts or "bundled held-out"), len(prompts)), plan, run,
                     server.how, before, after, greedy=config.greedy)
    # the client shares the machine with the server (and whatever else runs): say how busy it was
    results["machine"] = {"cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
                          "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "loadtest.json").write_text(json.dumps(results, indent=1) + "\n")
        plot(results, args.out / "loadtest.png")
        print(f"wrote {args.out / 'loadtest.json'} and loadtest.png", file=sys.stderr)
    print(json.dumps({k: v for k, v in results.items() if k not in ("requests", "timeline")}, indent=1))
    return 1 if args.fail_on_error and results["counts"]["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
