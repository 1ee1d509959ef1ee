"""The server's edge: who may call (an optional API key), how large a request may be, and which
status each kind of failure gets on either protocol (see hispec/errors.py for the causes)."""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass

import grpc
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from hispec.engine.executor import ExecutorFailure
from hispec.errors import EngineUnavailable, InvalidRequest, Overloaded
from hispec.serving.openai_api import error_body


@dataclass(frozen=True)
class Status:
    grpc: grpc.StatusCode
    http: int
    kind: str  # the OpenAI-style error `type`


CLIENT = Status(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error")
OVERLOADED = Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "overloaded_error")
UNAVAILABLE = Status(grpc.StatusCode.UNAVAILABLE, 503, "unavailable")
INTERNAL = Status(grpc.StatusCode.INTERNAL, 500, "server_error")
UNAUTHENTICATED = Status(grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error")


def status_of(error: BaseException) -> Status:
    """By cause. Errors raised in the engine replica arrive wrapped by Ray (a RayTaskError that is
    also an instance of the original class), so isinstance sees through the wrapping."""
    if isinstance(error, InvalidRequest):
        return CLIENT
    if isinstance(error, Overloaded | BackPressureError):  # the replica's limit, or Serve's queue limit
        return OVERLOADED
    if isinstance(error, EngineUnavailable | ExecutorFailure | RayActorError | ActorUnavailableError):
        return UNAVAILABLE  # the engine (process, stage or replica) died; it is being rebuilt
    return INTERNAL


def is_retryable(error: BaseException) -> bool:
    """Whether running the request again can only help: the engine failed before it produced anything
    (or the replica holding it died)."""
    if isinstance(error, EngineUnavailable):
        return error.retryable
    return isinstance(error, RayActorError | ActorUnavailableError)


def message_of(error: BaseException) -> str:
    """What went wrong, without Ray's wrapping: an error raised in the engine replica arrives as a
    RayTaskError whose text is a whole traceback; its `cause` is the exception itself."""
    cause = getattr(error, "cause", None)
    return str(cause if isinstance(cause, BaseException) else error) or type(error).__name__


def bearer_matches(authorization: str | None, api_key: str) -> bool:
    """`Authorization: Bearer KEY`, compared in constant time (no early exit on the first wrong byte)."""
    scheme, _, given = (authorization or "").partition(" ")
    return hmac.compare_digest(given.strip().encode(), api_key.encode()) and scheme.lower() == "bearer"


@dataclass(frozen=True)
class EdgePolicy:
    api_key: str | None
    max_request_bytes: int


class _BodyTooLarge(Exception):
    pass


class EdgeGuard:
    """ASGI middleware in front of every HTTP route: the API key (401) and the body size (413, from
    Content-Length at once, else counted as the body arrives). The policy is set on the app's state by
    the ingress when it starts (`app.state.edge`); until then nothing is served anyway."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        policy: EdgePolicy | None = getattr(scope.get("app") and scope["app"].state, "edge", None)
        if scope["type"] != "http" or policy is None:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if policy.api_key is not None and not bearer_matches(headers.get("authorization"), policy.api_key):
            await _answer(send, UNAUTHENTICATED.http, error_body(
                "missing or wrong API key: send `Authorization: Bearer <key>`", None, UNAUTHENTICATED.kind),
                [(b"www-authenticate", b"Bearer")])
            return
        limit = policy.max_request_bytes
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            await _answer(send, 413, _too_large(limit))
            return
        received, started = 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise _BodyTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await _answer(send, 413, _too_large(limit))


def _too_large(limit: int) -> dict:
    return error_body(f"the request body exceeds {limit} bytes", None, code="request_too_large")


async def _answer(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})
