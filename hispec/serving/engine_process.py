"""The engine loop in a process of its own, driven from the Serve replica through two pipes.

A Serve replica process also runs Ray's core worker, the replica's event loop, request streaming
and metrics, and all of them take the GIL. The engine loop drops and retakes the GIL at every
torch op (hundreds per step), so in the replica's process it waited behind all of that: on the
2-core CPU box one step took 1.5-2x as long as the same engine alone (measured; docs/serving.md).
In a process of its own the engine shares its GIL with nobody but a pipe reader that sleeps.

    engine = EngineProcess(functools.partial(build_engine, args)).start()   # blocks until built
    engine.submit(request, sink)     # sink(Committed | Failed), called on a reader thread
    engine.abort(request_id)
    engine.snapshot(), engine.summary, engine.alive, engine.stop()

The child runs an `EngineLoop` (the engine on its own thread, built there) and forwards commands
to it; each loop iteration sends one message back: the events of that step and a load snapshot.
If the child dies, every open request fails and `alive` turns false (the replica's health check
then fails and Serve replaces the replica). If the replica dies, the child sees its pipe close
and exits. The child inherits the replica's environment, so it sees the GPU Ray assigned to the
replica (CUDA_VISIBLE_DEVICES) and nothing else.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from hispec.serving.engine_loop import Committed, EngineLoop, Failed, LoopSnapshot, Sink
from hispec.engine import SpecEngine
from hispec.errors import EngineUnavailable
from hispec.speculation.hierarchy import Hierarchy
from hispec.speculation.request import Request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSummary:
    """What the replica needs to know about the engine it cannot see."""

    num_layers: int
    vocab_size: int
    capacity: int  # tokens per sequence (prompt + new)
    max_batch_size: int  # sequences decoded at once: the KV cache's slots (max_batch_size, or fewer if the budget is smaller)
    kv_cache: str  # KVLayout.describe()
    policy: str  # BatchPolicy.describe()
    hierarchy: Hierarchy  # what a lone request gets (stats of results without their own)

    @classmethod
    def of(cls, engine: SpecEngine) -> "EngineSummary":
        cfg = engine.model_config
        return cls(cfg.num_layers, cfg.vocab_size, engine.capacity, engine.num_slots, engine.kv_layout.describe(),
                   engine.policy.describe(), engine.hierarchy)


class EngineProcess:
    def __init__(self, build_engine: Callable[[], SpecEngine],
                 on_step: Callable[[LoopSnapshot], None] | None = None) -> None:
        """`build_engine` runs in the child, so it must pickle (a module-level function or a
        functools.partial of one); `on_step` runs in this process after every engine step."""
        context = multiprocessing.get_context("spawn")  # never fork a process full of Ray threads
        child_commands, self._commands = context.Pipe(duplex=False)  # (receiving end, sending end)
        self._events, child_events = context.Pipe(duplex=False)
        self._process = context.Process(target=_child_main, args=(build_engine, child_commands, child_events),
                                        name="hispec-engine", daemon=True)
        self._child_ends = (child_commands, child_events)
        self.on_step = on_step
        self.summary: EngineSummary | None = None
        self._sinks: dict[str, Sink] = {}
        self._lock = threading.Lock()  # guards _sinks and the command pipe
        self._snapshot = LoopSnapshot(0, 0, 0)
        self._exited = threading.Event()
        self._reader = threading.Thread(target=self._read, name="hispec-engine-events", daemon=True)

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self, timeout_s: float | None = None) -> "EngineProcess":
        """Starts the child and returns once its engine is built (or raises why it was not)."""
        self._process.start()
        for end in self._child_ends:  # the child holds its own copies now
            end.close()
        waited = 0.0
        while not self._events.poll(1.0):
            waited += 1.0
            if not self._process.is_alive():
                raise RuntimeError(f"the engine process exited while starting (exit code {self._process.exitcode})")
            if timeout_s is not None and waited >= timeout_s:
                self._process.terminate()
                raise TimeoutError(f"the engine process was not ready after {timeout_s:.0f} s")
        kind, payload = self._events.recv()
        if kind == "failed":
            self._process.join(10)
            raise payload
        self.summary = payload
        self._snapshot = LoopSnapshot(0, 0, self.summary.max_batch_size)
        self._reader.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._process.is_alive():
            try:
                self._send(("stop", None))
            except OSError:
                pass
            self._process.join(timeout_s)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(timeout_s)
        if self._reader.is_alive():
            self._exited.wait(timeout_s)

    @property
    def alive(self) -> bool:
        return self.summary is not None and self._process.is_alive() and not self._exited.is_set()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    # ---- requests (any thread) -----------------------------------------------------------
    def submit(self, request: Request, sink: Sink) -> None:
        if request.on_tokens is not None:
            raise ValueError("requests for an engine process stream through their sink, not on_tokens")
        with self._lock:
            sent = self.alive
            if sent:
                self._sinks[request.request_id] = sink
                try:
                    self._commands.send(("submit", request))
                except OSError:  # the child just died; the reader fails the others
                    del self._sinks[request.request_id]
                    sent = False
        if not sent:
            sink(Failed(EngineUnavailable("the engine process is not running; it is being rebuilt")))

    def abort(self, request_id: str) -> None:
        """Drop a request (e.g. its client went away); its sink hears nothing more."""
        with self._lock:
            if self._sinks.pop(request_id, None) is not None and self.alive:
                try:
                    self._commands.send(("abort", request_id))
                except OSError:
                    pass  # the child is gone, and the request with it

    def snapshot(self) -> LoopSnapshot:
        return self._snapshot

    def _send(self, message: tuple) -> None:
        with self._lock:
            self._commands.send(message)

    # ---- the reader thread ---------------------------------------------------------------
    def _read(self) -> None:
        try:
            while True:
                try:
                    _, events, snapshot = self._events.recv()
                except (EOFError, OSError):
                    break
                self._snapshot = snapshot
                for request_id, event in events:
                    with self._lock:
                        last = isinstance(event, Failed) or event.result is not None
                        sink = self._sinks.pop(request_id, None) if last else self._sinks.get(request_id)
                    if sink is not None:
                        _call_quietly(sink, event)
                if self.on_step is not None:
                    _call_quietly(self.on_step, snapshot)
        finally:
            self._exited.set()
            self._process.join(5)
            error = EngineUnavailable(f"the engine process exited (exit code {self._process.exitcode}); "
                                      "it is being rebuilt")
            with self._lock:
                sinks, self._sinks = list(self._sinks.values()), {}
            for sink in sinks:
                _call_quietly(sink, Failed(error))


def _call_quietly(callback: Callable, argument) -> None:
    """A failing sink or metrics hook (e.g. its event loop already closed) must not stop the reader."""
    try:
        callback(argument)
    except Exception:  # noqa: BLE001
        log.exception("engine event callback failed")


# ---- the child -----------------------------------------------------------------------------
def _child_main(build_engine: Callable[[], SpecEngine], commands: Connection, events: Connection) -> None:
    # a spawned process starts with no logging set up: ours goes to its stderr (the replica's log)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("hispec").setLevel(logging.INFO)
    outbox: list[tuple[str, Committed | Failed]] = []  # touched on the engine thread only

    def flush(snapshot: LoopSnapshot) -> None:  # EngineLoop's on_step: once per loop iteration
        batch = outbox[:]
        outbox.clear()
        events.send(("step", batch, snapshot))

    def sink_for(request_id: str) -> Sink:
        def sink(event: Committed | Failed) -> None:
            if isinstance(event, Failed):
                event = Failed(_picklable(event.error))
            outbox.append((request_id, event))
        return sink

    try:
        loop = EngineLoop(build_engine, on_step=flush).start()
    except BaseException as error:  # noqa: BLE001 - reported to the replica, which raises it
        events.send(("failed", _picklable(error)))
        return
    events.send(("ready", EngineSummary.of(loop.engine)))
    while loop.alive:
        try:
            if not commands.poll(0.5):  # wake up now and then: the loop may have stopped on an executor failure
                continue
            kind, payload = commands.recv()
        except (EOFError, OSError):  # the replica is gone
            break
        if kind == "submit":
            loop.submit(payload, sink_for(payload.request_id))
        elif kind == "abort":
            loop.abort(payload)
        elif kind == "stop":
            break
    loop.stop()


def _picklable(error: BaseException) -> BaseException:
    """The error itself when it survives pickling, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(error).__name__}: {error}")
