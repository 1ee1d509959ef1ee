"""`hispec bench-serve` against the running server: steady-state windows, JSON and plot written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hispec.bench.serving import tokens_in_window

pytestmark = pytest.mark.slow


def test_tokens_in_window_counts_only_arrivals_inside():
    arrivals = [(0.5, 3), (1.0, 2), (1.5, 4), (2.0, 7), (2.5, 1)]
    assert tokens_in_window(arrivals, 1.0, 2.0) == 6  # [1.0, 2.0): the message at 2.0 is outside
    assert tokens_in_window(arrivals, 3.0, 4.0) == 0


def test_bench_serve_writes_results(server, tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "hispec.cli", "bench-serve", "--target", server.grpc, "--concurrency", "1,3",
         "--duration", "2", "--ramp", "0.5", "--warmup", "0.5", "--repeats", "1", "--max-new-tokens", "12",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "serving.json").read_text())
    assert set(results["levels"]) == {"1", "3"}
    for level in results["levels"].values():
        assert level["tokens_per_s"] > 0 and level["requests"] >= 1
        assert 0 < level["ttft_p50_s"] <= level["latency_p50_s"]
    assert results["outputs_identical_across_concurrency"] is True
    assert results["speedup_over_1"]["1"] == 1.0
    assert (out / "serving.png").stat().st_size > 0


def test_bench_serve_by_application_name(server, tmp_path):
    """--apps sends the `application` metadata (how deploy/hispec-compare.yaml's two applications are
    told apart) and reports each application with its ratio to the first."""
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "hispec.cli", "bench-serve", "--target", server.grpc, "--apps", "hispec",
         "--concurrency", "1,2", "--duration", "1.5", "--ramp", "0.5", "--warmup", "0.5", "--repeats", "1",
         "--max-new-tokens", "12", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "serving.json").read_text())
    assert results["config"]["apps"] == ["hispec"]
    assert set(results["apps"]["hispec"]["levels"]) == {"1", "2"}
    assert results["outputs_identical_across_apps_and_concurrency"] is True
    assert results["tokens_per_s_over_hispec"] == {"hispec": {"1": 1.0, "2": 1.0}}
    assert (out / "serving.png").stat().st_size > 0
