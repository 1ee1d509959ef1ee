"""The engine deployment: a replica owns the model and runs the batched engine loop (in a child
process, see engine_process.py).

Requests arrive as prompt token ids + validated parameters (the ingress tokenizes and checks)
and join the running batch; committed tokens stream back as `Chunk`s: the first at once, then
whatever was committed within `stream_interval_s`, then the last at once. Fewer, larger Serve
messages leave the CPU to the model. The per-token loop never leaves this replica.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator

from ray import serve

from hispec.engine import ExecutorFailure
from hispec.errors import EngineUnavailable, InvalidRequest, Overloaded
from hispec.serving.admission import Admission, Ticket
from hispec.serving.config import AppArgs
from hispec.serving.engine_build import build_engine, detokenizer, pipeline_spec_for
from hispec.serving.engine_loop import Failed
from hispec.serving.engine_process import EngineProcess
from hispec.serving.logs import log_like_serve
from hispec.serving.messages import Chunk, EngineInfo
from hispec.serving.metrics import EngineMetrics, GpuMonitor
from hispec.serving.params import GenerationParams, Limits
from hispec.speculation import Request
from hispec.speculation.request import cut_at_stop
from hispec.speculation.text import StreamingText

log = logging.getLogger(__name__)


@serve.deployment(
    name="HiSpecEngine",
    # Many concurrent streams per replica: they are batched together, not served one at a time.
    max_ongoing_requests=96,  # above max_batch_size + max_queued_requests: the replica refuses first
    autoscaling_config={"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 16},
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
)
class HiSpecEngine:
    def __init__(self, args: dict) -> None:
        log_like_serve()
        self.args = AppArgs.model_validate(args)
        from transformers import AutoTokenizer

        self._detokenize = detokenizer(AutoTokenizer.from_pretrained(self.args.model, trust_remote_code=False))
        self.metrics = EngineMetrics()
        self.gpus = GpuMonitor()
        self.pipeline = None  # with pipeline_stages > 1: the stage actors in this replica's placement group
        self._rebuilding = asyncio.Lock()
        self.engine = self._start_engine()
        summary = self.engine.summary
        self.info = EngineInfo(self.args.served_name, summary.num_layers, summary.vocab_size, summary.max_batch_size,
                               [summary.policy],
                               Limits(summary.capacity, summary.vocab_size, self.args.default_max_new_tokens,
                                      self.args.max_prompt_chars, self.args.max_stop_strings))
        self.admission = Admission(summary.max_batch_size + self.args.max_queued_requests,
                                   f"the server is at capacity ({summary.max_batch_size} running and "
                                   f"{self.args.max_queued_requests} queued requests); retry later",
                                   lambda: self.engine if self._engine_down() is None else None)
        log.info("engine ready (process %s): %s, policy %s; %s", self.engine.pid, self.args.model, summary.policy,
                 summary.kv_cache)

    def _start_engine(self) -> EngineProcess:
        """The engine process; with pipeline_stages > 1, first the stage actors it drives (in bundles
        1..S of this replica's placement group; bundle 0 holds the replica)."""
        connection = None
        if self.args.pipeline_stages > 1:
            import ray

            from hispec.pipeline import Pipeline

            self.pipeline = Pipeline.create(pipeline_spec_for(self.args),
                                            placement_group=ray.util.get_current_placement_group(), first_bundle=1)
            connection = self.pipeline.connection
        try:
            return EngineProcess(functools.partial(build_engine, self.args, connection),
                                 on_step=self.metrics.observe_load).start()
        except BaseException:
            if self.pipeline is not None:
                self.pipeline.shutdown()
            raise

    def _engine_down(self) -> str | None:
        """Why the engine cannot serve (its process exited, or a pipeline stage died), or None."""
        if not self.engine.alive:
            return "the engine process stopped"
        return self.pipeline.failure() if self.pipeline is not None else None

    async def _ensure_engine(self) -> None:
        """Rebuild the engine process (and its pipeline) in place when it died: requests that ran on
        it have already ended with UNAVAILABLE; new ones wait here for the rebuild, and health
        reports "not serving" meanwhile."""
        if self._engine_down() is None:
            return
        async with self._rebuilding:
            reason = self._engine_down()
            if reason is None:
                return
            log.warning("engine down (%s): rebuilding it", reason)
            started = time.perf_counter()
            await asyncio.to_thread(self._rebuild)
            log.info("engine rebuilt in %.1f s (process %s)", time.perf_counter() - started, self.engine.pid)

    def _rebuild(self) -> None:
        self.engine.stop(timeout_s=5)
        if self.pipeline is not None:
            self.pipeline.shutdown()
            self.pipeline = None
        self.engine = self._start_engine()

    async def generate(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[Chunk]:
        """Streams the continuation of `prompt_ids` (called with `handle.options(stream=True)`)."""
        try:
            ticket = self.admission.enter()  # synchronous with the check: no await between counting and the limit
        except Overloaded:
            self.metrics.rejected.inc()
            raise
        try:
            async for chunk in self._generate(prompt_ids, params, ticket):
                yield chunk
        finally:
            self.admission.leave(ticket)

    async def _generate(self, prompt_ids: list[int], params: GenerationParams, ticket: Ticket) -> AsyncIterator[Chunk]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        request = Request(prompt_ids, params.new_tokens_for(len(prompt_ids), self.info.limits, "max_new_tokens"),
                          params.sampling, stop_strings=params.stop, request_id=uuid.uuid4().hex)
        text = StreamingText(self._detokenize, params.stop)
        await self._ensure_engine()
        started = last = time.perf_counter()
        finished = False
        ticket.engine = self.engine
        self.engine.submit(request, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            while not finished:
                first = not text.tokens
                batch = await self._next_batch(events, first)
                if isinstance(batch[-1], Failed):
                    finished = True
                    raise self._by_cause(batch[-1].error, request.request_id, streamed=not first)
                token_ids = [t for event in batch for t in event.token_ids]
                now = time.perf_counter()
                self.metrics.observe_tokens(len(token_ids), now - last, first)
                last = now
                piece = text.push(token_ids)
                result = batch[-1].result
                if result is None:
                    yield Chunk(token_ids, piece, prompt_tokens=len(prompt_ids), completion_tokens=len(text.tokens))
                    continue
                finished = True
                final, _ = cut_at_stop(self._detokenize(result.token_ids), params.stop)
                stats = result.stats.to_dict(result.hierarchy or self.engine.summary.hierarchy)
                self.metrics.observe_finished(result.finish_reason, len(prompt_ids), len(result.token_ids), stats,
                                              now - started)
                yield Chunk(token_ids, piece + text.finish(final), result.finish_reason, len(prompt_ids),
                            len(result.token_ids), stats)
        finally:
            if not finished:  # the caller went away (client disconnect, cancellation)
                self.engine.abort(request.request_id)
                self.metrics.cancelled.inc()

    def _by_cause(self, error: Exception, request_id: str, streamed: bool) -> Exception:
        """What a failed request raises to the ingress: client errors as they are, engine failures as
        EngineUnavailable (retryable while nothing was streamed; the engine is rebuilt at once), anything
        else as an internal error, logged here with the request id."""
        if isinstance(error, InvalidRequest | Overloaded):
            return error
        if isinstance(error, EngineUnavailable | ExecutorFailure):
            asyncio.get_running_loop().create_task(self._ensure_engine())
            return EngineUnavailable(str(error), retryable=not streamed)
        log.error("request %s failed inside the engine: %s: %s", request_id, type(error).__name__, error)
        return RuntimeError(f"internal error in the engine (request {request_id}): {type(error).__name__}: {error}")

    async def _next_batch(self, events: asyncio.Queue, first: bool) -> list:
        """The events of the next chunk: one, then (unless it is the first) whatever else is committed
        within stream_interval_s. The last event (a result or a failure) ends a batch at once."""
        batch = [await events.get()]
        deadline = time.perf_counter() + (0.0 if first else self.args.stream_interval_s)
        while not _is_last(batch[-1]):
            if not events.empty():
                batch.append(events.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(events.get(), remaining))
            except TimeoutError:
                break
        return batch

    def get_info(self) -> EngineInfo:
        return self.info

    def load(self) -> dict:
        """What Health / healthz report. Queued: requests in this replica not decoding yet, whether
        waiting in the engine or still being set up here (both hold a place in the bounded queue)."""
        snap = self.engine.snapshot()
        return {"serving": self._engine_down() is None and not self._rebuilding.locked(),
                "active_sequences": snap.active,
                "queued_requests": max(snap.queued, self.admission.holding() - snap.active)}

    async def check_health(self) -> None:
        """Serve restarts the replica when this raises; a dead engine process or stage is rebuilt in
        place first, so only a rebuild that fails takes the replica down."""
        await self._ensure_engine()
        if not self.engine.alive:
            raise RuntimeError("the engine process has stopped")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()
        pipeline = getattr(self, "pipeline", None)
        if pipeline is not None:
            pipeline.shutdown()
        gpus = getattr(self, "gpus", None)
        if gpus is not None:
            gpus.stop()


def _is_last(event) -> bool:
    return isinstance(event, Failed) or event.result is not None
