"""Prometheus metrics (ray.serve.metrics) show up on the Ray node's metrics endpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
import requests

from hispec.rpc import hispec_pb2 as pb
from hispec.rpc import hispec_pb2_grpc as rpc

pytestmark = pytest.mark.slow

# Ray lists every node's metrics export address here (for Prometheus service discovery).
DISCOVERY = Path("/tmp/ray/prom_metrics_service_discovery.json")
WANTED = ["hispec_requests_received", "hispec_request_errors", "hispec_requests_finished", "hispec_prompt_tokens",
          "hispec_generated_tokens", "hispec_proposed_tokens", "hispec_accepted_tokens", "hispec_acceptance_rate",
          "hispec_time_to_first_token_seconds", "hispec_inter_token_latency_seconds", "hispec_request_latency_seconds",
          "hispec_queue_depth", "hispec_active_sequences", "hispec_kv_slots_in_use", "hispec_kv_slots"]


def scrape() -> str:
    targets = [t for group in json.loads(DISCOVERY.read_text()) for t in group["targets"]]
    return "\n".join(requests.get(f"http://{t}/metrics", timeout=10).text for t in targets)


def value(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(f"ray_{name}") and not line.startswith("#") and "_bucket" not in line
               and "_sum" not in line)


def test_metrics_are_exported(server):
    with grpc.insecure_channel(server.grpc) as channel:
        stub = rpc.HiSpecStub(channel)
        stub.Generate(pb.GenerateRequest(prompt="def main():", max_new_tokens=12))
        with pytest.raises(grpc.RpcError):
            stub.Generate(pb.GenerateRequest(prompt="x", top_p=3.0))
    deadline = time.monotonic() + 90  # metrics are pushed to the agent every few seconds
    while True:
        text = scrape()
        missing = [name for name in WANTED if f"ray_{name}" not in text]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert not missing, f"not exported: {missing}"
    assert value(text, "hispec_generated_tokens") >= 12
    assert value(text, "hispec_kv_slots{") == 16  # the one replica's max_batch_size
    assert 'code="INVALID_ARGUMENT"' in text
    assert 'level="1"' in text  # acceptance is reported per level
