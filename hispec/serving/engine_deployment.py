"""The engine deployment: a replica owns the model and runs the batched engine loop.

Requests arrive as prompt token ids + validated parameters (the ingress tokenizes and checks)
and join the running batch; committed tokens stream back as `Chunk`s: the first at once, then
whatever was committed within `stream_interval_s`, then the last at once. Fewer, larger Serve
messages leave the CPU to the model. The per-token loop never leaves this replica.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator

import torch
from ray import serve

from hispec.model import load_model
from hispec.serving.config import AppArgs
from hispec.serving.engine_loop import EngineLoop, Failed
from hispec.serving.messages import Chunk, EngineInfo
from hispec.serving.metrics import EngineMetrics, GpuMonitor
from hispec.serving.params import GenerationParams, InvalidArgument, Limits
from hispec.spec import EngineConfig, Request, SpecEngine, resolve_policy
from hispec.spec.request import cut_at_stop
from hispec.spec.text import StreamingText

log = logging.getLogger(__name__)

GIL_SWITCH_INTERVAL_S = 0.0005


@serve.deployment(
    name="HiSpecEngine",
    # Many concurrent streams per replica: they are batched together, not served one at a time.
    max_ongoing_requests=64,
    autoscaling_config={"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 16},
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
)
class HiSpecEngine:
    def __init__(self, args: dict) -> None:
        self.args = AppArgs.model_validate(args)
        # The engine thread drops the GIL at every torch op and Ray's threads (streaming chunks out)
        # take it in between; a short switch interval hands it back sooner (default 5 ms).
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.args.model)
        self.metrics = EngineMetrics()
        self.gpus = GpuMonitor()
        self.loop = EngineLoop(self._build_engine, on_step=self.metrics.observe_load).start()
        engine = self.loop.engine
        cfg = engine.model.config
        self.info = EngineInfo(self.args.served_name, cfg.num_layers, cfg.vocab_size, self.args.max_batch_size,
                               [engine.policy.describe()],
                               Limits(engine.capacity, cfg.vocab_size, self.args.default_max_new_tokens,
                                      self.args.max_prompt_chars, self.args.max_stop_strings))
        log.info("engine ready: %s, policy %s", self.args.model, engine.policy.describe())

    def _build_engine(self) -> SpecEngine:
        """Runs on the engine thread (see EngineLoop): every torch op of this replica happens there."""
        args = self.args
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        # Ray sets OMP_NUM_THREADS to the replica's num_cpus; torch_threads overrides it.
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        model = load_model(args.model, dtype=args.dtype, device=device)
        policy = resolve_policy(args.method, model.config.num_layers, args.model, args.exits, args.budgets)
        engine = SpecEngine(model, policy, EngineConfig(args.max_batch_size, args.max_context),
                            detokenize=self._detokenize)
        log.info("engine built on %s with %d torch threads", device, torch.get_num_threads())
        return engine

    def _detokenize(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    async def generate(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[Chunk]:
        """Streams the continuation of `prompt_ids` (called with `handle.options(stream=True)`)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        request = Request(prompt_ids, params.new_tokens_for(len(prompt_ids), self.info.limits, "max_new_tokens"),
                          params.sampling, stop_strings=params.stop, request_id=uuid.uuid4().hex)
        text = StreamingText(self._detokenize, params.stop)
        started = last = time.perf_counter()
        finished = False
        self.loop.submit(request, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            while not finished:
                first = not text.tokens
                batch = await self._next_batch(events, first)
                if isinstance(batch[-1], Failed):
                    finished = True
                    error = batch[-1].error
                    raise InvalidArgument("prompt", str(error)) if isinstance(error, ValueError) else error
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
                stats = result.stats.to_dict(result.hierarchy or self.loop.engine.hierarchy)
                self.metrics.observe_finished(result.finish_reason, len(prompt_ids), len(result.token_ids), stats,
                                              now - started)
                yield Chunk(token_ids, piece + text.finish(final), result.finish_reason, len(prompt_ids),
                            len(result.token_ids), stats)
        finally:
            if not finished:  # the caller went away (client disconnect, cancellation)
                self.loop.abort(request.request_id)

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
        snap = self.loop.snapshot()
        return {"serving": self.loop.alive, "active_sequences": snap.active, "queued_requests": snap.queued}

    def check_health(self) -> None:
        """Serve restarts the replica when this raises."""
        if not self.loop.alive:
            raise RuntimeError("the engine loop thread has stopped")

    def __del__(self) -> None:
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.stop()
        gpus = getattr(self, "gpus", None)
        if gpus is not None:
            gpus.stop()


def _is_last(event) -> bool:
    return isinstance(event, Failed) or event.result is not None
