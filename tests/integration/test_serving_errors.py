"""Bad input gets INVALID_ARGUMENT / HTTP 4xx naming the field, and the server keeps serving."""

from __future__ import annotations

import math

import grpc
import pytest
import requests

from hispec.rpc import hispec_pb2 as pb
from hispec.rpc import hispec_pb2_grpc as rpc

pytestmark = pytest.mark.slow

BAD_GRPC = [
    ("prompt", dict(prompt="")),
    ("prompt", dict(prompt="x" * 100_001)),
    ("prompt", dict(prompt="def f():\n    return 1\n" * 200)),  # > 512 tokens
    ("max_new_tokens", dict(max_new_tokens=0)),
    ("max_new_tokens", dict(max_new_tokens=-5)),
    ("max_new_tokens", dict(max_new_tokens=10_000)),
    ("temperature", dict(temperature=-1.0)),
    ("temperature", dict(temperature=math.nan)),
    ("temperature", dict(temperature=math.inf)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)),
    ("top_p", dict(top_p=math.nan)),
    ("top_k", dict(top_k=-3)),
    ("seed", dict(seed=-1)),
    ("stop", dict(stop=[""])),
    ("stop", dict(stop=["s"] * 17)),
]


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc) as channel:
        yield rpc.HiSpecStub(channel)


@pytest.mark.parametrize("field, fields", BAD_GRPC, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_GRPC)])
def test_grpc_invalid_argument(stub, field, fields):
    request = pb.GenerateRequest(**({"prompt": "def f():"} | fields))
    for call in (stub.Generate, lambda r: list(stub.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as caught:
            call(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith(f"{field}:"), caught.value.details()


BAD_HTTP = [
    (400, "prompt", {"prompt": ""}),
    (400, "prompt", {"prompt": "def f():\n    return 1\n" * 200}),
    (400, "prompt", {}),
    (400, "prompt", {"prompt": 5}),
    (400, "max_tokens", {"prompt": "x", "max_tokens": 0}),
    (400, "max_tokens", {"prompt": "x", "max_tokens": "many"}),
    (400, "max_tokens", {"prompt": "def f():\n    return 1\n" * 40, "max_tokens": 500}),
    (400, "temperature", {"prompt": "x", "temperature": -0.5}),
    (400, "top_p", {"prompt": "x", "top_p": 7}),
    (400, "top_k", {"prompt": "x", "top_k": -9}),
    (400, "seed", {"prompt": "x", "seed": -2}),
    (400, "stop", {"prompt": "x", "stop": [""]}),
    (400, "n", {"prompt": "x", "n": 3}),
    (400, "logprobs", {"prompt": "x", "logprobs": 2}),
    (400, "stream_options.include_usage", {"prompt": "x", "stream_options": {"include_usage": "maybe"}}),
    (400, "frobnicate", {"prompt": "x", "frobnicate": 1}),
    (404, "model", {"prompt": "x", "model": "gpt-9"}),
]


@pytest.mark.parametrize("status, field, body", BAD_HTTP, ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(BAD_HTTP)])
def test_http_4xx(server, status, field, body):
    for stream in (False, True):
        response = requests.post(f"{server.http}/v1/completions", json=body | {"stream": stream}, timeout=60)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["param"] == field and error["message"], error


def test_non_finite_json_numbers(server):
    for value in ("NaN", "Infinity", "-Infinity"):
        response = requests.post(f"{server.http}/v1/completions", timeout=60, headers={"Content-Type": "application/json"},
                                 data=f'{{"prompt": "x", "temperature": {value}}}')
        assert response.status_code == 400 and response.json()["error"]["param"] == "temperature", response.text


def test_malformed_json(server):
    response = requests.post(f"{server.http}/v1/completions", timeout=60, headers={"Content-Type": "application/json"},
                             data='{"prompt": "x", ')
    assert response.status_code == 400 and response.json()["error"]["message"]


def test_still_serving_after_bad_input(stub, server):
    assert len(stub.Generate(pb.GenerateRequest(prompt="def f():", max_new_tokens=5)).token_ids) == 5
    response = requests.post(f"{server.http}/v1/completions", json={"prompt": "import", "max_tokens": 3}, timeout=60)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
    health = stub.Health(pb.HealthRequest())
    assert health.serving and health.active_sequences == 0
