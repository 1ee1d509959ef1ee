"""Errors by cause: what the server answers depends on whose fault it is, never on the Python type
an internal check happened to raise.

    InvalidRequest     the client's request is wrong       gRPC INVALID_ARGUMENT   HTTP 400
    Overloaded         no room now; retry later            gRPC RESOURCE_EXHAUSTED HTTP 429
    EngineUnavailable  the engine died / is being rebuilt  gRPC UNAVAILABLE        HTTP 503
    anything else      a bug                               gRPC INTERNAL           HTTP 500 (logged with the request id)

Each survives pickling (they cross the engine process's pipe and Ray calls intact).
"""

from __future__ import annotations


class HiSpecError(Exception):
    """Base of the errors the server maps to a status of their own."""


class InvalidRequest(HiSpecError, ValueError):
    """A bad request field. `field` uses the caller's API names (e.g. `max_tokens` over HTTP)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def __reduce__(self):
        return type(self), (self.field, self.message)


class Overloaded(HiSpecError):
    """The engine holds as many requests as it may (running + queued): refused at once, not queued."""


class EngineUnavailable(HiSpecError):
    """The engine (its process, or a pipeline stage) failed or is being rebuilt; `retryable` when the
    request produced nothing yet, so running it again elsewhere or later changes nothing for the client."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable

    def __reduce__(self):
        return type(self), (str(self), self.retryable)
