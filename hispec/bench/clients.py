"""Timed requests to a running HiSpec server: one coroutine per (protocol, mode), shared by
`hispec bench-serve` and `hispec loadtest`.

    async with grpc_channel("127.0.0.1:9000") as channel:
        reply = await grpc_stream(HiSpecStub(channel), pb.GenerateRequest(prompt=p, max_new_tokens=32))
    async with http_session(concurrency=8) as session:
        reply = await http_stream(session, "http://127.0.0.1:8000", {"prompt": p, "max_tokens": 32})

Every call returns a `Reply` that says when each message with output arrived
(`time.perf_counter()` clock). `on_output(now, token_ids)` is called as each such message
arrives, so a caller that cancels a request midway still counts what it received. A request
that does not complete raises `RequestFailed` with a code: the gRPC status name
(`UNAVAILABLE`), the HTTP status (`503`), `in_band_error` (an error event inside a 200 stream),
`incomplete` (the response ended without a finish reason), or the client-side exception's name
(`ClientConnectorError`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

OnOutput = Callable[[float, Sequence[int]], None]
Metadata = Sequence[tuple[str, str]]


class RequestFailed(Exception):
    def __init__(self, protocol: str, code: str, message: str) -> None:
        super().__init__(f"{protocol} {code}: {message}")
        self.protocol, self.code, self.message = protocol, code, message


@dataclass(frozen=True)
class Reply:
    """One completed request as the client saw it."""

    started: float
    finished: float
    arrivals: tuple[tuple[float, int], ...]  # (time received, new tokens) of each message with text or tokens
    token_ids: tuple[int, ...]

    @property
    def latency_s(self) -> float:
        return self.finished - self.started

    @property
    def ttft_s(self) -> float:
        """Time to the first message with output (a unary reply: its whole latency)."""
        return (self.arrivals[0][0] if self.arrivals else self.finished) - self.started

    @property
    def time_per_output_token_s(self) -> float | None:
        """Mean time per token after the first message (a stream's decoding pace); None when
        everything came in one message."""
        after_first = len(self.token_ids) - self.arrivals[0][1] if self.arrivals else 0
        return (self.arrivals[-1][0] - self.arrivals[0][0]) / after_first if after_first > 0 else None

    @property
    def message_gaps_s(self) -> list[float]:
        """Time between consecutive messages with output (what a reader waits between updates)."""
        return [b[0] - a[0] for a, b in zip(self.arrivals, self.arrivals[1:])]


class _Recorder:
    """Collects a reply's arrivals as they come."""

    def __init__(self, on_output: OnOutput | None) -> None:
        self.started = time.perf_counter()
        self.arrivals: list[tuple[float, int]] = []
        self.token_ids: list[int] = []
        self.on_output = on_output

    def output(self, text: str, token_ids: Sequence[int]) -> None:
        if not text and not token_ids:
            return
        now = time.perf_counter()
        self.arrivals.append((now, len(token_ids)))
        self.token_ids += token_ids
        if self.on_output is not None:
            self.on_output(now, token_ids)

    def reply(self) -> Reply:
        return Reply(self.started, time.perf_counter(), tuple(self.arrivals), tuple(self.token_ids))


# ---- gRPC: hispec.v1.HiSpec --------------------------------------------------------------------
def grpc_channel(target: str):
    """An asyncio channel that never goes through an HTTP proxy from the environment."""
    import grpc

    return grpc.aio.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])


def _grpc_failed(error) -> RequestFailed:
    return RequestFailed("grpc", error.code().name, error.details() or "")


async def grpc_stream(stub, request, metadata: Metadata = (), on_output: OnOutput | None = None) -> Reply:
    """`GenerateStream`: the reply's arrivals are its messages."""
    import grpc

    recorder = _Recorder(on_output)
    finish_reason = ""
    try:
        async for message in stub.GenerateStream(request, metadata=tuple(metadata) or None):
            recorder.output(message.text, message.token_ids)
            finish_reason = message.finish_reason or finish_reason
    except grpc.aio.AioRpcError as error:
        raise _grpc_failed(error) from None
    if not finish_reason:
        raise RequestFailed("grpc", "incomplete", "the stream ended without a finish reason")
    return recorder.reply()


async def grpc_unary(stub, request, metadata: Metadata = (), on_output: OnOutput | None = None) -> Reply:
    """`Generate`: one arrival, the whole completion."""
    import grpc

    recorder = _Recorder(on_output)
    try:
        response = await stub.Generate(request, metadata=tuple(metadata) or None)
    except grpc.aio.AioRpcError as error:
        raise _grpc_failed(error) from None
    if not response.finish_reason:
        raise RequestFailed("grpc", "incomplete", "the response has no finish reason")
    recorder.output(response.text, response.token_ids)
    return recorder.reply()


# ---- HTTP: POST /v1/completions ----------------------------------------------------------------
def http_session(concurrency: int):
    """An aiohttp session with a connection per concurrent request, no total timeout (the caller
    bounds the run) and no proxy from the environment."""
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=10), trust_env=False)


def _choice_output(choice: dict) -> tuple[str, list[int]]:
    """(text, token ids) of a completion choice; the ids are HiSpec's extension (`hispec.token_ids`)."""
    return choice.get("text") or "", (choice.get("hispec") or {}).get("token_ids") or []


async def _post(session, base_url: str, body: dict, headers: dict[str, str]):
    import aiohttp

    try:
        response = await session.post(f"{base_url.rstrip('/')}/v1/completions", json=body, headers=headers)
    except aiohttp.ClientError as error:
        raise RequestFailed("http", type(error).__name__, str(error)) from None
    if response.status != 200:
        text = await response.text()
        response.release()
        raise RequestFailed("http", str(response.status), text[:300])
    return response


async def http_stream(session, base_url: str, body: dict, headers: dict[str, str] | None = None,
                      on_output: OnOutput | None = None) -> Reply:
    """`stream: true`: the reply's arrivals are its server-sent events with output."""
    import aiohttp

    recorder = _Recorder(on_output)
    response = await _post(session, base_url, {**body, "stream": True}, headers or {})
    finish_reason, done = None, False
    try:
        async for raw in response.content:  # one line at a time; events are "data: {...}\n\n"
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                raise RequestFailed("http", "in_band_error", event["error"].get("message", data)[:300])
            for choice in event.get("choices", []):
                recorder.output(*_choice_output(choice))
                finish_reason = choice.get("finish_reason") or finish_reason
    except aiohttp.ClientError as error:
        raise RequestFailed("http", type(error).__name__, str(error)) from None
    finally:
        response.release()
    if not (done and finish_reason):
        raise RequestFailed("http", "incomplete", "the stream ended without a finish reason and [DONE]")
    return recorder.reply()


async def http_unary(session, base_url: str, body: dict, headers: dict[str, str] | None = None,
                     on_output: OnOutput | None = None) -> Reply:
    """`stream: false`: one arrival, the whole completion."""
    import aiohttp

    recorder = _Recorder(on_output)
    response = await _post(session, base_url, {**body, "stream": False}, headers or {})
    try:
        choice = (await response.json())["choices"][0]
    except aiohttp.ClientError as error:
        raise RequestFailed("http", type(error).__name__, str(error)) from None
    finally:
        response.release()
    if not choice.get("finish_reason"):
        raise RequestFailed("http", "incomplete", "the response has no finish reason")
    recorder.output(*_choice_output(choice))
    return recorder.reply()
