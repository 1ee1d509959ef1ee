"""Soak: 1,000 requests at concurrency 16 through `serve run deploy/hispec.yaml`, spread over gRPC and
HTTP, unary and streaming: no errors, every output equal to plain greedy decoding, and the server's
memory flat (RSS growth under 10% between the first and the last 100 requests)."""

from __future__ import annotations

import itertools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

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

HTTP_PORT, GRPC_PORT = 8410, 9410
REQUESTS, CONCURRENCY, WINDOW = 1000, 16, 100
PROMPTS = bundled_heldout_prompts()[:32]
MAX_NEW = 12
MODES = [("grpc", False), ("grpc", True), ("http", False), ("http", True)]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    with server_for_tests("deploy/hispec.yaml", tmp_path_factory.mktemp("serve-soak"), http_port=HTTP_PORT,
                          grpc_port=GRPC_PORT, args={"stream_interval_s": 0.02}) as handle:
        yield handle


@pytest.fixture(scope="module")
def expected() -> dict[str, list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    model = load_model(DEFAULT_MODEL)
    return {p: greedy_generate(model, tokenizer(p)["input_ids"], MAX_NEW, model.config.eos_token_ids)[0]
            for p in PROMPTS}


class Client:
    """One request per call, any protocol and mode; returns the new token ids (raises on any error)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.channel = grpc.insecure_channel(server.grpc)
        self.stub = rpc.HiSpecStub(self.channel)
        self.sessions = threading.local()

    def __call__(self, prompt: str, protocol: str, stream: bool) -> list[int]:
        if protocol == "grpc":
            request = pb.GenerateRequest(prompt=prompt, max_new_tokens=MAX_NEW, temperature=0)
            if stream:
                return [t for message in self.stub.GenerateStream(request, timeout=120) for t in message.token_ids]
            return list(self.stub.Generate(request, timeout=120).token_ids)
        session = getattr(self.sessions, "session", None) or requests.Session()
        self.sessions.session = session
        body = {"prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0, "stream": stream}
        answer = session.post(f"{self.server.http}/v1/completions", json=body, stream=stream, timeout=120)
        answer.raise_for_status()
        if not stream:
            return answer.json()["choices"][0]["hispec"]["token_ids"]
        ids = []
        for line in answer.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"]["message"])
                ids += event["choices"][0]["hispec"]["token_ids"]
        return ids


def test_soak_1000_requests_at_concurrency_16(server, expected):
    client = Client(server)
    done = itertools.count(1)
    rss = {}
    mismatches, errors = [], []

    def one(index: int) -> None:
        prompt, (protocol, stream) = PROMPTS[index % len(PROMPTS)], MODES[index % len(MODES)]
        try:
            ids = client(prompt, protocol, stream)
            if ids != expected[prompt]:
                mismatches.append((index, protocol, stream))
        except Exception as error:  # noqa: BLE001 - every error is counted and shown
            errors.append((index, protocol, stream, repr(error)[:200]))
        finished = next(done)
        if finished == WINDOW:
            rss["first"] = server.rss_bytes()

    started = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, range(REQUESTS)))
    took = time.monotonic() - started
    rss["last"] = server.rss_bytes()
    growth = rss["last"] / rss["first"] - 1
    print(f"\nsoak: {REQUESTS} requests at concurrency {CONCURRENCY} in {took:.0f} s "
          f"({REQUESTS / took:.1f} req/s), {len(errors)} errors, {len(mismatches)} outputs unlike greedy; "
          f"server RSS after the first {WINDOW}: {rss['first'] >> 20} MiB, after all: {rss['last'] >> 20} MiB "
          f"({growth:+.1%})")
    assert not errors, errors[:5]
    assert not mismatches, mismatches[:5]
    assert growth < 0.10, rss
