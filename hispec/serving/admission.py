"""The engine replica's bounded queue: how many requests it holds (running + queued), and which of
them still hold a place.

A request holds a place from admission until its stream ends. One exception: a request submitted to
an engine that has since died is failing and holds none. Its generator may not have run its cleanup
yet when the ingress retries it (a request that streamed nothing is retried at once), and that retry
must not be refused for the place its dead attempt still holds.

Single-threaded: used from the replica's event loop only, with no await between check and count.
"""

from __future__ import annotations

from collections.abc import Callable

from hispec.errors import Overloaded


class Ticket:
    """One admitted request; `engine` is what it was submitted to (None while it is being set up or
    waits for an engine rebuild)."""

    __slots__ = ("engine",)

    def __init__(self) -> None:
        self.engine: object | None = None


class Admission:
    def __init__(self, limit: int, refusal: str, serving_engine: Callable[[], object | None]) -> None:
        """`limit`: running + queued requests; `refusal`: the Overloaded message; `serving_engine()`:
        the engine that serves now, or None while it is down (asked only when the queue looks full)."""
        if limit < 1:
            raise ValueError(f"the queue must hold at least one request, not {limit}")
        self.limit, self.refusal, self._serving_engine = limit, refusal, serving_engine
        self._open: set[Ticket] = set()

    def holding(self) -> int:
        """Requests holding a place: all open ones, less those on a dead (or replaced) engine."""
        if len(self._open) < self.limit:
            return len(self._open)  # the common case: no need to ask about engines
        serving = self._serving_engine()  # one question, not one per request
        return sum(1 for t in self._open if t.engine is None or t.engine is serving)

    def enter(self) -> Ticket:
        """A place for a new request, or Overloaded at once (RESOURCE_EXHAUSTED / 429: the client can
        go elsewhere; nothing queues without bound)."""
        if self.holding() >= self.limit:
            raise Overloaded(self.refusal)
        ticket = Ticket()
        self._open.add(ticket)
        return ticket

    def leave(self, ticket: Ticket) -> None:
        self._open.discard(ticket)
