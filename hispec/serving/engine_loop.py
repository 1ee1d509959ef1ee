"""The engine's own thread: requests join the running batch between steps (no Ray here).

The `SpecEngine` runs on a dedicated thread so that whoever feeds it (in serving: the engine
process's pipe reader, see engine_process.py) stays free while the model computes. Other threads
hand it requests and aborts through an inbox; it hands each request's committed tokens to that
request's sink.

The engine is also *built* on that thread, and no other thread runs torch ops: each thread that
runs parallel CPU kernels gets its own OpenMP team, and two teams spinning on a 2-core machine
cost the engine 20-40% of its speed (measured).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from hispec.engine import ExecutorFailure, SpecEngine
from hispec.errors import EngineUnavailable
from hispec.speculation.request import GenerationResult, Request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Committed:
    """Tokens one step committed for one request; `result` is set on its last event."""

    token_ids: list[int]
    result: GenerationResult | None = None


@dataclass(frozen=True)
class Failed:
    """The request could not be run (refused by the engine, or the engine failed mid-step)."""

    error: Exception


Sink = Callable[[Committed | Failed], None]  # called on the engine thread: must be quick, must not block


@dataclass(frozen=True)
class LoopSnapshot:
    """Load after a step, for metrics and health."""

    queued: int  # submitted, not yet admitted to a KV slot
    active: int  # sequences holding a KV slot
    slots: int
    step_seconds: float = 0.0  # the last step's duration (0: no step ran)


class EngineLoop:
    def __init__(self, build_engine: Callable[[], SpecEngine],
                 on_step: Callable[[LoopSnapshot], None] | None = None) -> None:
        self._build_engine = build_engine
        self.engine: SpecEngine | None = None
        self.on_step = on_step
        self._ready = threading.Event()
        self._build_error: BaseException | None = None
        self._inbox: list[tuple[Request, Sink]] = []
        self._aborts: list[str] = []
        self._sinks: dict[str, Sink] = {}
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="hispec-engine", daemon=True)

    # ---- any thread ----------------------------------------------------------------------
    def start(self) -> "EngineLoop":
        """Builds the engine on the loop's thread and returns once it is ready (or re-raises)."""
        self._thread.start()
        self._ready.wait()
        if self._build_error is not None:
            raise self._build_error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, request: Request, sink: Sink) -> None:
        with self._wakeup:
            self._inbox.append((request, sink))
            self._wakeup.notify()

    def abort(self, request_id: str) -> None:
        """Drop a request (e.g. its client went away); its sink hears nothing more."""
        with self._wakeup:
            self._aborts.append(request_id)
            self._wakeup.notify()

    def snapshot(self, step_seconds: float = 0.0) -> LoopSnapshot:
        with self._wakeup:
            inbox = len(self._inbox)
        return LoopSnapshot(inbox + self.engine.num_waiting, self.engine.num_running,
                            self.engine.num_slots, step_seconds)

    # ---- the engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._build_engine()
        except BaseException as error:
            self._build_error = error
            return
        finally:
            self._ready.set()
        while True:
            with self._wakeup:
                while not (self._stopping or self._inbox or self._aborts or self.engine.has_unfinished()):
                    self._wakeup.wait()
                if self._stopping:
                    break
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
            for request, sink in inbox:
                self._admit(request, sink)
            for request_id in aborts:
                if self._sinks.pop(request_id, None) is not None:
                    self.engine.abort(request_id)
            step_seconds = 0.0
            if self.engine.has_unfinished():
                started = time.perf_counter()
                self._step()
                step_seconds = time.perf_counter() - started
            if self.on_step is not None:
                self.on_step(self.snapshot(step_seconds))
        self._fail_all(RuntimeError("the engine is shutting down"))

    def _admit(self, request: Request, sink: Sink) -> None:
        try:
            self.engine.add_request(request)
        except Exception as error:  # refused (InvalidRequest), or a bug: this request fails, the loop goes on
            if not isinstance(error, ValueError):
                log.exception("admitting request %s failed", request.request_id)
            sink(Failed(error))
            return
        self._sinks[request.request_id] = sink

    def _fail_all(self, error: Exception) -> None:
        """Abort every request the loop holds and tell its sink why."""
        for request_id, sink in self._sinks.items():
            self.engine.abort(request_id)
            sink(Failed(error))
        self._sinks.clear()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except ExecutorFailure as error:  # e.g. a pipeline stage died: nothing more can run here
            log.error("engine executor failed; failing %d requests and stopping: %s", len(self._sinks), error)
            self._fail_all(EngineUnavailable(f"the engine failed and is being rebuilt: {error}"))
            with self._wakeup:
                self._stopping = True  # the loop ends; its owner rebuilds the engine
            return
        except Exception as error:  # a bug, or out of memory: fail what ran (INTERNAL), keep serving the rest
            log.exception("engine step failed; aborting running requests %s", sorted(self._sinks))
            self._fail_all(RuntimeError(f"engine step failed: {type(error).__name__}: {error}"))
            return
        for out in outputs:
            sink = self._sinks.pop(out.request_id) if out.finished else self._sinks.get(out.request_id)
            if sink is None:
                continue
            try:
                sink(Committed(out.new_token_ids, out.result))
            except Exception:  # noqa: BLE001 - one request's handling failed: that request ends, the rest go on
                log.exception("handing tokens to request %s failed; aborting it", out.request_id)
                if self._sinks.pop(out.request_id, None) is not None:
                    self.engine.abort(out.request_id)
