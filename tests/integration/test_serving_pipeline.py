"""The served application on a 2-stage pipeline (`serve run deploy/hispec-pipeline.yaml`), on ports
of its own beside the session's `server`: greedy results equal plain greedy decoding of the full
model over every protocol, and a stage actor killed mid-stream fails the running requests fast
(UNAVAILABLE), after which the replica rebuilds its pipeline in place and serves exactly again."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
import requests
from transformers import AutoTokenizer

from hispec.bench.prompts import bundled_heldout_prompts
from hispec.model import load_model
from hispec.model.greedy import greedy_generate
from hispec.models import DEFAULT_MODEL
from hispec.rpc import hispec_pb2 as pb
from hispec.rpc import hispec_pb2_grpc as rpc
from tests.serve_process import Server, server_for_tests

pytestmark = pytest.mark.slow

CONFIG = "deploy/hispec-pipeline.yaml"
HTTP_PORT, GRPC_PORT = 8100, 9100  # not the session server's 8000/9000
STAGES = 2
PROMPTS = bundled_heldout_prompts()[:10]
MAX_NEW = 48
LONG_NEW = 400  # streams still running when the stage dies
FAIL_WITHIN_S = 10.0  # from the kill to every running stream's error
REBUILD_S = 60.0  # the in-place rebuild, allowed to the first request after it
CALL_TIMEOUT_S = 120.0  # no call can hang the test


@pytest.fixture(scope="module")
def pipeline_server(tmp_path_factory) -> Server:
    with server_for_tests(CONFIG, tmp_path_factory.mktemp("serve-pipeline"), http_port=HTTP_PORT,
                          grpc_port=GRPC_PORT) as handle:
        yield handle


@pytest.fixture(scope="module")
def stub(pipeline_server):
    with grpc.insecure_channel(pipeline_server.grpc) as channel:
        yield rpc.HiSpecStub(channel)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def expected(tokenizer) -> dict[str, list[int]]:
    """Plain greedy decoding of the full model in this process (no engine, no pipeline): prompt -> ids."""
    model = load_model(DEFAULT_MODEL)
    out = {}
    for prompt in PROMPTS:
        ids, _ = greedy_generate(model, tokenizer(prompt, add_special_tokens=True)["input_ids"], MAX_NEW,
                                 model.config.eos_token_ids)
        out[prompt] = ids
    return out


def _stage_actor_pids(server: Server) -> set[int]:
    return server.processes("ray::StageActor")


def test_greedy_equals_plain_greedy_over_every_protocol(stub, pipeline_server, expected):
    for prompt in PROMPTS:
        want = expected[prompt]
        unary = stub.Generate(pb.GenerateRequest(prompt=prompt, max_new_tokens=MAX_NEW, temperature=0),
                              timeout=CALL_TIMEOUT_S)
        assert list(unary.token_ids) == want, f"gRPC Generate differs for {prompt[:40]!r}"
        assert unary.usage.completion_tokens == len(want)

        messages = list(stub.GenerateStream(pb.GenerateRequest(prompt=prompt, max_new_tokens=MAX_NEW, temperature=0),
                                            timeout=CALL_TIMEOUT_S))
        assert [t for m in messages for t in m.token_ids] == want, f"gRPC GenerateStream differs for {prompt[:40]!r}"
        assert messages[-1].finish_reason in ("length", "stop")

        answer = requests.post(f"{pipeline_server.http}/v1/completions", timeout=CALL_TIMEOUT_S,
                               json={"prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["hispec"]["token_ids"] == want, f"HTTP differs for {prompt[:40]!r}"


class _Stream(threading.Thread):
    """One GenerateStream call, consumed on a thread: when its first message came, how it ended."""

    def __init__(self, stub, prompt: str) -> None:
        super().__init__(daemon=True)
        self.stub, self.prompt = stub, prompt
        self.started = threading.Event()
        self.tokens = 0
        self.error: grpc.RpcError | None = None
        self.ended_at: float | None = None
        self.finish_reason = ""

    def run(self) -> None:
        request = pb.GenerateRequest(prompt=self.prompt, max_new_tokens=LONG_NEW, temperature=0,
                                     stop=["\x00never"])
        try:
            for message in self.stub.GenerateStream(request, timeout=CALL_TIMEOUT_S):
                self.tokens += len(message.token_ids)
                self.finish_reason = message.finish_reason or self.finish_reason
                self.started.set()
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.ended_at = time.monotonic()
            self.started.set()


def test_stage_death_fails_running_streams_then_rebuilds(stub, pipeline_server, expected):
    before = _stage_actor_pids(pipeline_server)
    assert len(before) == STAGES, f"expected {STAGES} stage actors, found pids {sorted(before)}"

    streams = [_Stream(stub, PROMPTS[i]) for i in range(8)]  # 8 concurrent streams (max_batch_size 16: all running)
    for stream in streams:
        stream.start()
    deadline = time.monotonic() + CALL_TIMEOUT_S
    for stream in streams:
        assert stream.started.wait(max(0.0, deadline - time.monotonic())), "a stream never started"
    assert all(s.ended_at is None for s in streams), \
        [(s.prompt[:30], s.tokens, s.finish_reason, s.error) for s in streams if s.ended_at is not None]

    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    for stream in streams:
        stream.join(timeout=CALL_TIMEOUT_S)
        assert not stream.is_alive(), "a stream neither ended nor timed out"

    for stream in streams:
        assert stream.error is not None, \
            f"a stream ended without an error ({stream.tokens} tokens, finish {stream.finish_reason!r})"
        assert stream.error.code() == grpc.StatusCode.UNAVAILABLE, (stream.error.code(), stream.error.details())
        details = stream.error.details() or ""
        assert "pipeline" in details or "stage" in details, details
        assert stream.ended_at - killed_at <= FAIL_WITHIN_S, \
            f"a stream failed {stream.ended_at - killed_at:.1f} s after the kill"

    prompt = PROMPTS[9]
    asked = time.monotonic()
    response = stub.Generate(pb.GenerateRequest(prompt=prompt, max_new_tokens=MAX_NEW, temperature=0),
                             timeout=REBUILD_S + CALL_TIMEOUT_S / 2)
    took = time.monotonic() - asked
    assert list(response.token_ids) == expected[prompt]
    assert took <= REBUILD_S + 30, f"the first request after the kill took {took:.1f} s"

    deadline = time.monotonic() + 30
    while True:  # the killed actor is gone at once; its sibling once the old pipeline is shut down
        after = _stage_actor_pids(pipeline_server)
        if (len(after) == STAGES and not after & before) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(after) == STAGES and not after & before, \
        f"stage actors before the kill {sorted(before)}, after the rebuild {sorted(after)}"


def test_health_ok_after_rebuild(stub, pipeline_server):
    answer = requests.get(f"{pipeline_server.http}/healthz", timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "ok" and body["serving"] is True
    assert stub.Health(pb.HealthRequest(), timeout=30).serving
