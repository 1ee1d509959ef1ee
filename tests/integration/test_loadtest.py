"""`hispec loadtest` against a real `serve run deploy/hispec.yaml` (its own ports, 8310/9310)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.serve_process import server_for_tests

pytestmark = pytest.mark.slow

KINDS = {"grpc-stream", "grpc-unary", "http-stream", "http-unary"}


def loadtest(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hispec.cli", "loadtest", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with server_for_tests("deploy/hispec.yaml", tmp_path_factory.mktemp("serve"), http_port=8310,
                          grpc_port=9310) as handle:
        yield handle


def _ordered(stats: dict) -> bool:
    return 0 < stats["p50"] <= stats["p95"] <= stats["p99"] <= stats["max"]


def test_loadtest_reports_a_clean_run(server, tmp_path):
    out = tmp_path / "load"
    done = loadtest("--http", server.http, "--grpc", server.grpc, "--requests", "40", "--concurrency", "8",
                    "--max-tokens", "8,16", "--distinct-prompts", "10", "--time-limit", "80",
                    "--server-pid", str(server.pid), "--fail-on-error", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "loadtest.json").read_text())

    counts = results["counts"]
    assert counts == {"planned": 40, "issued": 40, "ok": 40, "failed": 0, "cancelled_at_time_limit": 0,
                      "not_issued": 0}
    assert results["errors"] == {"grpc": {}, "http": {}}
    assert set(results["by_kind"]) == KINDS  # the default mix, 40 draws: every kind sent
    assert sum(kind["ok"] for kind in results["by_kind"].values()) == 40
    assert sum(length["ok"] for length in results["by_max_tokens"].values()) == 40
    assert set(results["by_max_tokens"]) == {"8", "16"}

    for key in ("latency_s", "ttft_s", "time_per_output_token_s", "inter_message_gap_s"):
        assert _ordered(results[key]), (key, results[key])
    assert results["latency_s"]["count"] == 40
    streams = sum(results["by_kind"][k]["ok"] for k in ("grpc-stream", "http-stream"))
    assert results["ttft_s"]["count"] == streams
    for kind in ("grpc-stream", "http-stream"):  # a stream's first output comes before its end
        assert results["by_kind"][kind]["ttft_s"]["p50"] < results["by_kind"][kind]["latency_s"]["p50"]

    tokens = sum(r["tokens"] for r in results["requests"])
    assert 0 < tokens <= sum(r["max_tokens"] for r in results["requests"])
    assert results["throughput"]["tokens_received"] == tokens
    assert results["throughput"]["requests_per_s"] > 0 and results["throughput"]["tokens_per_s"] > 0
    assert sum(results["timeline"]["requests_completed"]) == 40
    assert sum(results["timeline"]["tokens"]) == tokens
    consistency = results["greedy_consistency"]  # 10 prompts, 4 requests each: outputs compared
    assert consistency["requests_compared"] == 40 and consistency["mismatched_prompts"] == []

    memory = results["server_memory"]
    titles = " ".join(p["title"] for p in memory["processes"])
    assert "ray::ServeReplica:hispec:HiSpecEngine" in titles and "ray::ProxyActor" in titles
    assert memory["before_mb"] > 100 and memory["after_mb"] > 100  # the engine process holds the model
    assert memory["peak_mb"] >= max(memory["before_mb"], memory["after_mb"])

    assert results["machine"]["cpus"] >= 1 and len(results["machine"]["load_average_after"]) == 3
    assert (out / "loadtest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_limit_cancels_what_is_in_flight(server, tmp_path):
    """More work than the limit allows: it stops issuing, cancels, and every request is accounted for;
    the server memory is found from the listening port (no --server-pid)."""
    done = loadtest("--http", server.http, "--grpc", server.grpc, "--requests", "200", "--concurrency", "4",
                    "--max-tokens", "128", "--mix", "grpc-stream,http-stream", "--time-limit", "3",
                    "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "loadtest.json").read_text())
    counts = results["counts"]
    assert counts["cancelled_at_time_limit"] == 4 and counts["failed"] == 0 and counts["not_issued"] > 0
    assert counts["ok"] + counts["cancelled_at_time_limit"] + counts["not_issued"] == 200 == counts["planned"]
    assert results["wall_s"] < 10
    assert "listens on port" in results["server_memory"]["processes_from"]
    assert any("ray::ServeReplica" in p["title"] for p in results["server_memory"]["processes"])
    # the server is still fine afterwards: the cancelled streams were aborted, not left running
    again = loadtest("--http", server.http, "--grpc", server.grpc, "--requests", "4", "--max-tokens", "4",
                     "--fail-on-error")
    assert again.returncode == 0, again.stderr[-3000:]


@pytest.mark.parametrize("target", [["--http", "http://10.1.2.3:8000"], ["--grpc", "[2001:db8::1]:9000"]])
def test_non_loopback_targets_are_refused(target):
    """The command refuses before sending anything (more addresses: tests/unit/test_loadtest.py)."""
    done = loadtest(*target, timeout=60)
    assert done.returncode == 2
    assert "not a loopback address" in done.stderr
