"""Fuzz: hundreds of malformed or hostile requests over HTTP and gRPC against one real server.

Every hostile request must get a client error with a message (HTTP 4xx with a JSON error body,
gRPC INVALID_ARGUMENT & co. with details); a valid greedy request over each protocol must keep
answering the same text in between; and no process of the server may restart.

The cases are tables: (field x kind of badness) for the JSON body and for the protobuf request,
raw bodies for what JSON or protobuf cannot say, and the transport's own mistakes (content type,
method, route, size). `pytest -s` prints how many requests got which status.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
import requests

from hispec.rpc import hispec_pb2 as pb
from hispec.rpc import hispec_pb2_grpc as rpc
from tests.serve_process import Server, server_for_tests

pytestmark = pytest.mark.slow

CONFIG = "deploy/hispec.yaml"
HTTP_PORT, GRPC_PORT = 8320, 9320
CHECK_EVERY = 20  # hostile requests between two checks that valid requests still get the same answer
TIMEOUT_S = 30  # one hostile request; a server that needs longer to refuse it has failed the case
VALID_PROMPT, VALID_TOKENS = "def f():", 8
MB = 1 << 20

# What a client error may look like. gRPC: INVALID_ARGUMENT for a bad field, RESOURCE_EXHAUSTED for a
# message over the size limit, UNIMPLEMENTED for a method that does not exist, and INTERNAL only with
# grpcio's own words for bytes it could not deserialize (the proxy decodes requests before our code runs).
HTTP_CLIENT_ERRORS = {400, 404, 405, 413, 415, 422}
GRPC_CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                      grpc.StatusCode.UNIMPLEMENTED}
GRPC_DESERIALIZE_DETAILS = "deserializ"  # grpcio: "Exception deserializing request!"


# ---- the cases ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class HttpCase:
    name: str
    body: bytes
    method: str = "POST"
    path: str = "/v1/completions"
    content_type: str | None = "application/json"


@dataclass(frozen=True)
class GrpcCase:
    name: str
    method: str  # "Generate" (unary) or "GenerateStream"
    payload: bytes  # the serialized request, or bytes that are no GenerateRequest at all


@dataclass(frozen=True)
class ServedLimits:
    """What ModelInfo says the server accepts: the cases are built to lie just beyond it."""

    max_context: int
    vocab_size: int
    max_prompt_chars: int


def raw_body(fields: dict[str, str]) -> bytes:
    """A JSON object from raw JSON texts per field, so NaN, 1e309 and 20-digit integers go out as written."""
    return ("{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields.items()) + "}").encode()


def body(**fields) -> bytes:
    return json.dumps({"prompt": VALID_PROMPT, "max_tokens": 4} | fields).encode()


# JSON values of every kind, each once; a field is sent each kind it does not accept.
JSON_KINDS = {
    "string": "a string",
    "bool": True,
    "int": 7,
    "float": 1.5,
    "null": None,
    "list": [1, "two", None],
    "object": {"nested": {"junk": [None, {}]}},
}
# The kinds each /v1/completions field accepts (int is a number for the float fields).
FIELD_KINDS = {
    "model": {"string", "null"},
    "prompt": {"string", "list"},  # list of strings or of token ids; the mixed list is tried below
    "max_tokens": {"int", "null"},
    "temperature": {"int", "float", "null"},
    "top_p": {"int", "float", "null"},
    "top_k": {"int", "null"},
    "seed": {"int", "null"},
    "stop": {"string", "null"},  # a list of strings too; the mixed list is tried below
    "stream": {"bool"},
    "stream_options": {"null"},  # an object with its own fields; the junk object is not one
    "n": {"int"},
    "best_of": {"int", "null"},
    "echo": {"bool"},
    "logprobs": {"int", "null"},
    "suffix": {"string", "null"},
    "presence_penalty": {"int", "float", "null"},
    "frequency_penalty": {"int", "float", "null"},
    "logit_bias": {"null"},  # token -> number; the junk object is not one
    "user": {"string", "null"},
}
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
# Raw JSON numbers out of range (or not finite) per numeric field.
BAD_NUMBERS = {
    "max_tokens": ["0", "-1", str(INT64_MIN), str(INT64_MAX), str(2**63), str(2**64), "1" + "0" * 30, "1e308",
                   "NaN", "Infinity", "100000"],
    "temperature": ["NaN", "Infinity", "-Infinity", "1e309", "-1e309", "-1", "-1e-300", str(INT64_MIN)],
    "top_p": ["NaN", "Infinity", "-Infinity", "1e309", "0", "-0.0", "1.0000001", "2", "-1", str(2**64)],
    "top_k": ["-2", str(INT64_MIN), str(INT64_MAX), str(2**63), str(2**64), "-1" + "0" * 30, "NaN", "2.5"],
    "seed": ["-1", str(INT64_MIN), str(2**63), str(2**64), str(-2**64), "1" + "0" * 40, "NaN", "1e3"],
    "n": ["3", "0", "-1", str(2**64)],
    "logprobs": ["5", "-1", str(INT64_MAX)],
    "best_of": ["2", str(INT64_MIN)],
    "presence_penalty": ["0.5", "NaN", "-Infinity"],
    "frequency_penalty": ["-2", "Infinity"],
}


def http_cases(limits: ServedLimits) -> Iterator[HttpCase]:
    for field, accepted in FIELD_KINDS.items():
        for kind, value in JSON_KINDS.items():
            if kind not in accepted:
                yield HttpCase(f"type/{field}={kind}", body(**{field: value}))
    for field, literals in BAD_NUMBERS.items():
        for literal in literals:
            for stream in ("false", "true"):
                yield HttpCase(f"number/{field}={literal[:24]}/stream={stream}", raw_body(
                    {"prompt": json.dumps(VALID_PROMPT), field: literal, "stream": stream}))
    yield from _prompt_cases(limits)
    yield from _stop_cases()
    yield from _body_cases()
    yield from _transport_cases()


def _prompt_cases(limits: ServedLimits) -> Iterator[HttpCase]:
    prompts = {
        "empty": "", "empty-list": [], "empty-text-in-list": ["x", ""], "null-in-list": ["x", None],
        "mixed-list": ["x", 1], "nested-ids": [[1, 2]], "float-id": [1, 2.5], "bool-id": [True],
        "negative-id": [1, -1], "id=vocab": [1, limits.vocab_size], "id=int64-min": [INT64_MIN],
        "id=int64-max": [INT64_MAX], "id=2**64": [2**64], "id=-2**64": [-2**64],
        "ids-over-context": [1] * limits.max_context, "10000-ids": [1] * 10_000,
        "chars-over-limit": "x" * (limits.max_prompt_chars + 1),
        "tokens-over-context": "def f():\n    return 1\n" * (limits.max_context // 2),
        "10000-prompts": ["def f():"] * 10_000, "10000-empty-prompts": [""] * 10_000,
        "10000-prompts-last-bad": ["x"] * 9_999 + [5], "10000-id-lists": [[1]] * 10_000,
    }
    for name, prompt in prompts.items():
        yield HttpCase(f"prompt/{name}", body(prompt=prompt))
    # JSON may spell lone surrogates, which are no Unicode text
    yield HttpCase("prompt/lone-surrogate", b'{"prompt": "def \\ud800 f():", "max_tokens": 4}')
    yield HttpCase("prompt/lone-surrogate-in-list", b'{"prompt": ["x", "\\udfff"], "max_tokens": 4}')
    yield HttpCase("prompt/10MB", body(prompt="x" * (10 * MB)))
    yield HttpCase("prompt/missing", json.dumps({"max_tokens": 4}).encode())
    yield HttpCase("max_tokens/over-context-left", body(prompt="def f():\n    return 1\n" * 40,
                                                         max_tokens=limits.max_context - 1))


def _stop_cases() -> Iterator[HttpCase]:
    stops = {
        "10000-strings": ["s"] * 10_000, "17-strings": [f"s{i}" for i in range(17)], "empty-string": "",
        "empty-in-list": ["a", ""], "1MB-string": "x" * MB, "257-chars": "x" * 257, "null-in-list": ["a", None],
        "int-in-list": ["a", 3], "nested-list": [["a"]], "object-in-list": [{"a": "b"}],
    }
    for name, stop in stops.items():
        yield HttpCase(f"stop/{name}", body(stop=stop))
    yield HttpCase("stop/lone-surrogate", b'{"prompt": "x", "max_tokens": 4, "stop": ["\\ud800"]}')


def _body_cases() -> Iterator[HttpCase]:
    raw = {
        "empty": b"", "whitespace": b"  \n ", "truncated": b'{"prompt": "x", ', "brace": b"}", "null": b"null",
        "list": b"[]", "string": b'"def f():"', "number": b"1", "true": b"true",
        "invalid-utf8-in-string": b'{"prompt": "\xff\xfe def"}', "invalid-utf8-key": b'{"\xc3\x28": 1}',
        "binary": bytes(range(256)) * 4, "nul-bytes": b"\x00" * 64,
        "trailing-garbage": b'{"prompt": "x", "max_tokens": 4} trailing',
        "single-quotes": b"{'prompt': 'x'}", "comments": b'{"prompt": "x" /* hi */}',
        "deep-nesting": b"[" * 100_000 + b"]" * 100_000,
        "deep-nested-field": b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        "5000-digit-int": b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}",
        "duplicate-key-last-bad": b'{"prompt": "x", "prompt": 5}',
    }
    for name, data in raw.items():
        yield HttpCase(f"body/{name}", data)
    unknown = {
        "one-unknown": {"frobnicate": 1}, "proto-pollution": {"__proto__": {"admin": True}},
        "1000-unknown": {f"field{i}": i for i in range(1000)}, "unknown-in-stream-options": {
            "stream": True, "stream_options": {"include_usage": True, "junk": 1}},
        "chat-messages": {"messages": [{"role": "user", "content": "hi"}]},
    }
    for name, fields in unknown.items():
        yield HttpCase(f"unknown/{name}", body(**fields))
    unsupported = {"n=3": {"n": 3}, "logprobs=5": {"logprobs": 5}, "echo": {"echo": True}, "best_of=2": {"best_of": 2},
                   "suffix": {"suffix": "x"}, "logit_bias": {"logit_bias": {"1": 100}}, "model": {"model": "gpt-9"}}
    for name, fields in unsupported.items():
        yield HttpCase(f"unsupported/{name}", body(**fields))


def _transport_cases() -> Iterator[HttpCase]:
    valid = body()
    for content_type in ("text/plain", "application/xml", "multipart/form-data; boundary=x",
                         "application/x-www-form-urlencoded", "application/octet-stream"):
        yield HttpCase(f"content-type/{content_type}", valid, content_type=content_type)
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        yield HttpCase(f"method/{method}", valid, method=method)
    yield HttpCase("method/POST-models", valid, path="/v1/models")
    yield HttpCase("method/POST-healthz", valid, path="/healthz")
    for path in ("/v1/chat/completions", "/v2/completions", "/v1/completions/extra", "/v1/../../etc/passwd",
                 "/%ff%fe", "/" + "a" * 4000):
        yield HttpCase(f"route/{path[:40]}", valid, path=path)
    yield HttpCase("size/10MB-body", b'{"prompt": "x", "user": "' + b"u" * (10 * MB) + b'"}')


def grpc_request(**fields) -> bytes:
    return pb.GenerateRequest(**({"prompt": VALID_PROMPT, "max_new_tokens": 4} | fields)).SerializeToString()


def grpc_cases(limits: ServedLimits) -> Iterator[GrpcCase]:
    bad_fields = {
        "max_new_tokens": [0, -1, -2**31, 2**31 - 1, limits.max_context],
        "temperature": [math.nan, math.inf, -math.inf, -1.0, -1e-45, -3.4e38],
        "top_p": [0.0, -0.0, math.nan, math.inf, -math.inf, 1.0000001, 2.0, -1.0, 3.4e38],
        "top_k": [-2, -2**31],
        "seed": [-1, INT64_MIN],
        "stop": [[""], ["s"] * 17, ["s"] * 10_000, ["x" * MB], ["x" * 257], ["a", ""]],
        "prompt": ["", "x" * (limits.max_prompt_chars + 1), "def f():\n    return 1\n" * (limits.max_context // 2),
                   "x" * (5 * MB)],  # the last one is a message over gRPC's usual 4 MB
    }
    requests_ = [(f"{field}={_short(value)}", grpc_request(**{field: value}))
                 for field, values in bad_fields.items() for value in values]
    requests_.append(("prompt+max_new_tokens-over-context", grpc_request(
        prompt="def f():\n    return 1\n" * 40, max_new_tokens=limits.max_context - 1)))
    # bytes that are no GenerateRequest (the proxy decodes them), and odd ones that decode to an empty prompt
    junk = {
        "0xff": b"\xff", "truncated-string": b"\x0a\x10abc", "invalid-utf8-prompt": b"\x0a\x04\xff\xfe\xfd\xfc",
        "invalid-utf8-stop": b"\x0a\x01x\x3a\x02\xc3\x28", "incomplete-varint": b"\x10",
        "overlong-varint": b"\x10" + b"\xff" * 11, "field-0": b"\x00\x01", "wire-type-7": b"\x0f",
        "unterminated-group": b"\x0b", "random": bytes(range(255, 0, -7)) * 9,
        "length-2GB": b"\x0a\xff\xff\xff\xff\x07",
        "empty-message": b"", "wire-type-mismatch": b"\x12\x01a",  # decode: max_new_tokens as bytes is unknown
        "seed-10-byte-varint": grpc_request(seed=0)[:-1] + b"\xff" * 9 + b"\x01",  # seed = 2**64 - 1 = -1
    }
    requests_ += [(f"bytes/{name}", payload) for name, payload in junk.items()]
    for name, payload in requests_:
        for method in ("Generate", "GenerateStream"):
            yield GrpcCase(f"{method}/{name}", method, payload)
    yield GrpcCase("unknown-method/Nope", "Nope", grpc_request())
    yield GrpcCase("unknown-method/lowercase", "generate", grpc_request())
    yield GrpcCase("junk/ModelInfo", "ModelInfo", b"\xff\xff")
    yield GrpcCase("junk/Health", "Health", b"\x0a\x10abc")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:16]}...({len(value)})"


# Extremes that are in range: not hostile, but they reach the sampler (float32 underflow and overflow,
# the widest integers), which must still give tokens. Sampled with temperature 1 unless greedy.
EXTREMES_HTTP = {
    "temperature=1e-45": {"temperature": 1e-45}, "temperature=1e308": {"temperature": 1e308},
    "top_p=5e-324": {"temperature": 1, "top_p": 5e-324}, "top_k=int32-max": {"temperature": 1, "top_k": 2**31 - 1},
    "top_k=-1": {"temperature": 1, "top_k": -1}, "seed=int64-max": {"temperature": 1, "seed": INT64_MAX},
    "max_tokens=1": {"temperature": 0, "max_tokens": 1},
}
FLOAT32_TINY, FLOAT32_MAX = 1.4e-45, 3.4e38
EXTREMES_GRPC = {
    "temperature=float32-tiny": {"temperature": FLOAT32_TINY}, "temperature=float32-max": {"temperature": FLOAT32_MAX},
    "top_p=float32-tiny": {"temperature": 1, "top_p": FLOAT32_TINY},
    "top_k=int32-max": {"temperature": 1, "top_k": 2**31 - 1}, "seed=int64-max": {"temperature": 1, "seed": INT64_MAX},
    "max_new_tokens=1": {"max_new_tokens": 1},
}


def extremes_not_served(server: Server, stub: rpc.HiSpecStub) -> list[str]:
    """The in-range extremes that did not come back with at least one token."""
    failures = []
    for name, fields in EXTREMES_HTTP.items():
        response = requests.post(f"{server.http}/v1/completions", timeout=60,
                                 json={"prompt": VALID_PROMPT, "max_tokens": 2} | fields)
        if response.status_code != 200 or response.json()["usage"]["completion_tokens"] < 1:
            failures.append(f"http {name}: {response.status_code} {response.text[:200]}")
    for name, fields in EXTREMES_GRPC.items():
        try:
            reply = stub.Generate(pb.GenerateRequest(**({"prompt": VALID_PROMPT, "max_new_tokens": 2} | fields)),
                                  timeout=60)
            if not reply.token_ids:
                failures.append(f"grpc {name}: no tokens")
        except grpc.RpcError as error:
            failures.append(f"grpc {name}: {error.code().name} {error.details()}")
    return failures


# ---- sending them -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    status: str  # "400", "INVALID_ARGUMENT", "timeout", ...
    message: str
    client_error: bool


def send_http(server: Server, case: HttpCase) -> Outcome:
    headers = {"Content-Type": case.content_type} if case.content_type else {}
    try:
        response = requests.request(case.method, server.http + case.path, data=case.body, headers=headers,
                                    timeout=TIMEOUT_S)
    except requests.RequestException as error:
        return Outcome(type(error).__name__, str(error), False)
    message = _http_message(response)
    return Outcome(str(response.status_code), message, response.status_code in HTTP_CLIENT_ERRORS and bool(message))


def _http_message(response: requests.Response) -> str:
    """Our {"error": {"message": ...}}, or FastAPI's own {"detail": ...} (404, 405, unparsable body)."""
    try:
        payload = response.json()
    except ValueError:
        return ""
    if not isinstance(payload, dict):
        return ""
    error = payload.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    detail = payload.get("detail")
    return detail if isinstance(detail, str) else json.dumps(detail) if detail else ""


def send_grpc(channel: grpc.Channel, case: GrpcCase) -> Outcome:
    path = f"/hispec.v1.HiSpec/{case.method}"
    identity: Callable[[bytes], bytes] = lambda data: data  # noqa: E731  (the server gets our bytes as they are)
    try:
        if case.method == "GenerateStream":
            list(channel.unary_stream(path, request_serializer=identity, response_deserializer=identity)(
                case.payload, timeout=TIMEOUT_S))
        else:
            channel.unary_unary(path, request_serializer=identity, response_deserializer=identity)(
                case.payload, timeout=TIMEOUT_S)
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
        client_error = bool(details) and (code in GRPC_CLIENT_ERRORS or (
            code == grpc.StatusCode.INTERNAL and GRPC_DESERIALIZE_DETAILS in details.lower()))
        return Outcome(code.name, details, client_error)
    return Outcome("OK", "", False)


# ---- the server and its valid answers -----------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory) -> Iterator[Server]:
    with server_for_tests(CONFIG, tmp_path_factory.mktemp("fuzz"), http_port=HTTP_PORT, grpc_port=GRPC_PORT) as server:
        yield server


def valid_answers(server: Server, stub: rpc.HiSpecStub) -> tuple[str, str]:
    """(gRPC text, HTTP text) of one greedy request each: the same prompt must give the same text every time."""
    grpc_text = stub.Generate(pb.GenerateRequest(prompt=VALID_PROMPT, max_new_tokens=VALID_TOKENS), timeout=60).text
    response = requests.post(f"{server.http}/v1/completions", timeout=60, json={
        "prompt": VALID_PROMPT, "max_tokens": VALID_TOKENS, "temperature": 0})
    assert response.status_code == 200, response.text
    return grpc_text, response.json()["choices"][0]["text"]


def server_processes(server: Server) -> dict[str, set[int]]:
    """The pids a restart would change: Serve's replicas and proxy, and the engine replica's children
    (its engine process)."""
    replicas = server.processes("ray::ServeReplica")
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", ",".join(map(str, sorted(replicas)))],
                              capture_output=True, text=True).stdout.split()
    return {"replicas": replicas, "proxies": server.processes("ray::ProxyActor"),
            "replica children": {int(pid) for pid in children}}


def test_hostile_requests_get_client_errors_and_the_server_keeps_serving(fuzz_server):
    server = fuzz_server
    with grpc.insecure_channel(server.grpc) as channel:
        stub = rpc.HiSpecStub(channel)
        info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)
        limits = ServedLimits(info.max_context, info.vocab_size, info.max_prompt_chars)
        processes = server_processes(server)
        assert processes["replicas"] and processes["proxies"], processes
        expected = valid_answers(server, stub)
        assert all(expected), expected

        cases: list[tuple[str, Callable[[], Outcome]]] = (
            [(f"http {c.name}", lambda c=c: send_http(server, c)) for c in http_cases(limits)]
            + [(f"grpc {c.name}", lambda c=c: send_grpc(channel, c)) for c in grpc_cases(limits)])
        statuses: Counter[str] = Counter()
        failures: list[str] = []
        started = time.monotonic()
        for sent, (name, send) in enumerate(cases, start=1):
            outcome = send()
            statuses[f"{name.split()[0]} {outcome.status}"] += 1
            if not outcome.client_error:
                failures.append(f"{name}: {outcome.status} {outcome.message[:200]!r}")
            if sent % CHECK_EVERY == 0 or sent == len(cases):
                assert valid_answers(server, stub) == expected, f"after {sent} hostile requests (last: {name})"
        elapsed = time.monotonic() - started
        extremes_failed = extremes_not_served(server, stub)
        assert valid_answers(server, stub) == expected, "after the in-range extremes"

        assert stub.Health(pb.HealthRequest(), timeout=30).serving
        assert server_processes(server) == processes, "a server process restarted"

    print(f"\n{len(cases)} hostile requests in {elapsed:.1f} s, valid requests checked every {CHECK_EVERY}:")
    for status, count in sorted(statuses.items()):
        print(f"  {status:32s} {count}")
    for failure in failures:
        print(f"  NOT A CLIENT ERROR: {failure}")
    print(f"{len(EXTREMES_HTTP) + len(EXTREMES_GRPC)} in-range extremes, not served: {extremes_failed or 'none'}")
    assert len(cases) >= 200
    assert not extremes_failed, extremes_failed
    assert not failures, f"{len(failures)} hostile requests got no client error:\n" + "\n".join(failures)
