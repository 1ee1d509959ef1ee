"""`hispec loadtest` without a server: targets, mix, plan, reply timings, the report's checks, process trees."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hispec.bench.clients import Reply
from hispec.bench.latency import percentile, summary
from hispec.bench.loadtest import (KINDS, LoadConfig, Outcome, Planned, build_parser, config_from, grpc_target,
                                   http_target, make_plan, parse_mix)
from hispec.bench.loadtest_report import greedy_consistency
from hispec.bench.server_memory import Process, ServerProcesses, descendants, rss_bytes


def config(*argv: str) -> LoadConfig:
    return config_from(build_parser().parse_args(list(argv)))


@pytest.mark.parametrize("argv", [
    ["--http", "http://10.1.2.3:8000"], ["--http", "http://example.com"], ["--http", "http://0.0.0.0:8000"],
    ["--grpc", "192.168.0.7:9000"], ["--grpc", "[2001:db8::1]:9000"], ["--grpc", "my-host:9000"],
])
def test_non_loopback_targets_are_refused(argv):
    with pytest.raises(ValueError, match="not a loopback address"):
        config(*argv)


@pytest.mark.parametrize("argv", [
    [], ["--http", "http://localhost:8310", "--grpc", "localhost:9310"],
    ["--http", "http://127.3.4.5:1", "--grpc", "127.0.0.1:1"], ["--http", "http://[::1]:8000", "--grpc", "[::1]:9000"],
])
def test_loopback_targets_are_accepted(argv):
    assert config(*argv).concurrency == 8


def test_target_parsing():
    assert http_target("http://127.0.0.1:8310/") == http_target("http://127.0.0.1:8310")
    assert http_target("http://localhost").port == 80
    assert grpc_target("[::1]:9310").host == "::1" and grpc_target("[::1]:9310").port == 9310
    for bad in ("127.0.0.1", "127.0.0.1:port"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            grpc_target(bad)
    with pytest.raises(ValueError, match="expected a URL"):
        http_target("127.0.0.1:8000")


def test_mix_parsing():
    assert parse_mix("grpc-stream=3,http-unary") == {"grpc-stream": 3.0, "http-unary": 1.0}
    assert set(parse_mix(",".join(KINDS))) == set(KINDS)
    for bad, message in (("grpc", "unknown kind"), ("http-stream=0", "must be > 0"), ("", "no kinds")):
        with pytest.raises(ValueError, match=message):
            parse_mix(bad)


def test_other_options_are_checked():
    for argv in (["--max-tokens", "8,0"], ["--requests", "0"], ["--time-limit", "0"], ["--temperature", "-1"]):
        with pytest.raises(ValueError):
            config(*argv)
    sampled = config("--temperature", "0.7", "--api-key", "secret")
    assert not sampled.greedy and "secret" not in repr(sampled)
    assert sampled.describe("bundled", 64)["api_key"] is True  # whether one was sent, never the key


def test_plan_follows_the_mix_and_lengths():
    plan = make_plan(config("--requests", "400", "--mix", "grpc-stream=3,http-unary=1", "--max-tokens", "8,32"), 7)
    assert [p.index for p in plan] == list(range(400))
    assert [p.prompt_index for p in plan[:9]] == [0, 1, 2, 3, 4, 5, 6, 0, 1]
    kinds = [p.kind for p in plan]
    assert set(kinds) == {"grpc-stream", "http-unary"} and 250 < kinds.count("grpc-stream") < 350
    assert {p.max_tokens for p in plan} == {8, 32}
    assert plan == make_plan(config("--requests", "400", "--mix", "grpc-stream=3,http-unary=1",
                                    "--max-tokens", "8,32"), 7)  # the seed fixes it


def test_reply_timings():
    reply = Reply(started=10.0, finished=11.0, arrivals=((10.2, 1), (10.5, 3), (10.8, 2)), token_ids=tuple(range(6)))
    assert reply.latency_s == pytest.approx(1.0) and reply.ttft_s == pytest.approx(0.2)
    assert reply.time_per_output_token_s == pytest.approx(0.6 / 5)  # 5 tokens after the first message
    assert reply.message_gaps_s == pytest.approx([0.3, 0.3])
    whole = Reply(10.0, 10.4, ((10.4, 6),), tuple(range(6)))  # a unary reply: one arrival
    assert whole.ttft_s == whole.latency_s and whole.time_per_output_token_s is None and whole.message_gaps_s == []


def test_greedy_consistency_compares_prefixes():
    def ok(index: int, prompt: int, ids: tuple[int, ...]) -> Outcome:
        return Outcome(Planned(index, "grpc-stream", prompt, 8), 0.0, reply=Reply(0.0, 1.0, ((0.5, len(ids)),), ids))

    outcomes = [ok(0, 0, (1, 2, 3, 4)), ok(1, 0, (1, 2)), ok(2, 1, (5, 6)), ok(3, 1, (5, 7, 8)), ok(4, 2, (9,)),
                Outcome(Planned(5, "http-unary", 2, 8), 0.0, cancelled=True)]
    result = greedy_consistency(outcomes)
    assert result == {"prompts_with_several_requests": 2, "requests_compared": 4, "mismatched_prompts": [1]}


def test_percentiles():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 51.0 and percentile(values, 99) == 99.0 and percentile([3.0], 95) == 3.0
    stats = summary(values)
    assert stats["count"] == 100 and stats["p50"] <= stats["p95"] <= stats["p99"] <= stats["max"] == 100.0
    assert summary([]) is None


def test_process_tree_and_rss():
    table = {pid: Process(pid, ppid, 0, f"p{pid}") for pid, ppid in ((1, 0), (2, 1), (3, 2), (4, 2), (5, 1), (6, 3))}
    assert descendants(table, {2}) == {2, 3, 4, 6}
    assert descendants(table, {5, 99}) == {5}
    assert rss_bytes(os.getpid()) > 10 * 1024 * 1024
    assert rss_bytes(2 ** 22 + 12345) is None
    # a tree with no Serve process in it (not this test's own: a session's test server may run under
    # it): with a root given, the whole subtree is measured
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        own = ServerProcesses(child.pid, "test").snapshot()
        assert child.pid in own.processes and own.total_bytes >= own.processes[child.pid][1] > 0
    finally:
        child.kill()
        child.wait()
