"""Serve autoscaling of whole pipelines on a local Ray cluster: the engine deployment, each replica a
2-stage pipeline on fractional CPU bundles, goes from 1 to 2 replicas under sustained load and back
to 1 after it, with short delays set for the test. No request fails or hangs during either
transition: every request is a greedy generation checked against plain greedy decoding, and
requests keep arriving (lightly) while the second replica drains away.

Timings of each phase are printed (`pytest -s`) and recorded in docs/pipeline.md."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml
from transformers import AutoTokenizer

from hispec.bench.prompts import bundled_heldout_prompts
from hispec.model import load_model
from hispec.model.greedy import greedy_generate
from hispec.models import DEFAULT_MODEL
from hispec.rpc import hispec_pb2 as pb
from hispec.rpc import hispec_pb2_grpc as rpc
from tests.serve_process import ROOT, Server, server_for_tests

pytestmark = pytest.mark.slow

HTTP_PORT, GRPC_PORT = 8200, 9200  # beside the session's server
REPLICA = "ray::ServeReplica:hispec:HiSpecEngine"
PROMPTS = bundled_heldout_prompts()[:4]
NEW_TOKENS = 24
HEAVY_CLIENTS, LIGHT_CLIENTS = 6, 1
UP_WITHIN_S, DOWN_WITHIN_S = 120.0, 120.0
CALL_TIMEOUT_S = 60.0


def autoscaling_config(tmp: Path) -> Path:
    """deploy/hispec-pipeline.yaml with room for two pipelines on 2 cores and quick scaling."""
    spec = yaml.safe_load((ROOT / "deploy/hispec-pipeline.yaml").read_text())
    spec["http_options"]["port"], spec["grpc_options"]["port"] = HTTP_PORT, GRPC_PORT
    app = spec["applications"][0]
    app["args"] |= {"stage_cpus": 0.25, "replica_cpus": 0.25}  # 0.75 CPU per pipeline
    engine = next(d for d in app["deployments"] if d["name"] == "HiSpecEngine")
    engine["autoscaling_config"] = {
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
        "metrics_interval_s": 0.5, "look_back_period_s": 2, "upscale_delay_s": 2, "downscale_delay_s": 6,
    }
    engine["graceful_shutdown_timeout_s"] = 30  # a replica being removed finishes its streams
    path = tmp / "hispec-autoscaling.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    tmp = tmp_path_factory.mktemp("autoscaling")
    with server_for_tests(str(autoscaling_config(tmp)), tmp) as handle:
        yield handle


@pytest.fixture(scope="module")
def expected() -> dict[str, list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    model = load_model(DEFAULT_MODEL)
    return {p: greedy_generate(model, tokenizer(p)["input_ids"], NEW_TOKENS)[0] for p in PROMPTS}


class Clients:
    """`n` threads sending greedy requests back to back until stopped; every outcome is kept."""

    def __init__(self, target: str, n: int, expected: dict[str, list[int]], streaming: bool = False) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = rpc.HiSpecStub(self.channel)
        self.expected, self.stop, self.streaming = expected, threading.Event(), streaming
        self.ok, self.failures = 0, []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]
        for thread in self.threads:
            thread.start()

    def _run(self, index: int) -> None:
        i = index
        while not self.stop.is_set():
            prompt = PROMPTS[i % len(PROMPTS)]
            i += 1
            try:
                request = pb.GenerateRequest(prompt=prompt, max_new_tokens=NEW_TOKENS)
                if self.streaming:
                    tokens = [t for m in self.stub.GenerateStream(request, timeout=CALL_TIMEOUT_S) for t in m.token_ids]
                else:
                    tokens = list(self.stub.Generate(request, timeout=CALL_TIMEOUT_S).token_ids)
                if tokens == self.expected[prompt]:
                    self.ok += 1
                else:
                    self.failures.append(f"wrong output for {prompt!r}")
            except grpc.RpcError as error:
                self.failures.append(f"{error.code().name}: {error.details()}")

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(CALL_TIMEOUT_S + 5)
        assert not any(t.is_alive() for t in self.threads), "a request hung"
        self.channel.close()


def wait_for_replicas(server: Server, count: int, within_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        if len(server.processes(REPLICA)) == count and len(server.processes("ray::StageActor")) == 2 * count:
            return time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError(f"not {count} replicas after {within_s:.0f} s: {len(server.processes(REPLICA))} replicas, "
                         f"{len(server.processes('ray::StageActor'))} stage actors\n{server.log_tail(30)}")


def test_pipelines_scale_up_under_load_and_down_after(server, expected):
    assert len(server.processes(REPLICA)) == 1 and len(server.processes("ray::StageActor")) == 2
    heavy = Clients(server.grpc, HEAVY_CLIENTS, expected)
    light = Clients(server.grpc, LIGHT_CLIENTS, expected, streaming=True)  # streams through the scale-down
    try:
        up_s = wait_for_replicas(server, 2, UP_WITHIN_S)
        time.sleep(5)  # both pipelines serve for a while
        heavy.finish()
        down_s = wait_for_replicas(server, 1, DOWN_WITHIN_S)
        time.sleep(3)  # the remaining pipeline goes on serving
    finally:
        heavy.finish()  # (again, if the scale-up failed: finishing twice is harmless)
        light.finish()
    print(f"\nscale-up {up_s:.1f} s after load began; scale-down {down_s:.1f} s after it ended; "
          f"requests ok: {heavy.ok} under load, {light.ok} light; failures: {heavy.failures + light.failures}")
    assert heavy.failures == [] and light.failures == []
    assert heavy.ok > 0 and light.ok > 0
