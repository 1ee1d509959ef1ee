"""The engine deployment: a replica owns the model and runs the batched engine loop.

Requests arrive as prompt token ids + validated parameters (the ingress tokenizes and checks)
and join the running batch; committed tokens stream back as `Chunk`s. Whatever has been
committed when the ingress reads again goes out as one chunk, so a slow reader costs one Serve
message per read, not one per token. The per-token loop never leaves this replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from ray import serve

from hispec.model import load_model
from hispec.serving.config import AppArgs
from hispec.serving.engine_loop import Committed, EngineLoop, Failed
from hispec.serving.metrics import EngineMetrics, GpuMonitor
from hispec.serving.params import GenerationParams, InvalidArgument, Limits
from hispec.spec import EngineConfig, Request, SpecEngine, resolve_policy
from hispec.spec.request import cut_at_stop
from hispec.spec.text import StreamingText

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chunk:
    """Tokens committed since the previous chunk; the last chunk has `finish_reason` and `stats`."""

    token_ids: list[int]
    text: str
    finish_reason: str = ""  # "stop", "length", "context" on the last chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0  # so far
    stats: dict | None = None  # RequestStats.to_dict(hierarchy), last chunk only


@dataclass(frozen=True)
class EngineInfo:
    model: str
    num_layers: int
    vocab_size: int
    max_batch_size: int
    hierarchies: list[str]
    limits: Limits


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
        from transformers import AutoTokenizer

        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.args.device == "auto" else self.args.device
        # Ray sets OMP_NUM_THREADS to the replica's num_cpus; torch_threads overrides it.
        threads = self.args.torch_threads or torch.get_num_threads()
        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(self.args.model)
        model = load_model(self.args.model, dtype=self.args.dtype, device=device)
        cfg = model.config
        policy = resolve_policy(self.args.method, cfg.num_layers, self.args.model, self.args.exits, self.args.budgets)
        self.engine = SpecEngine(model, policy, EngineConfig(self.args.max_batch_size, self.args.max_context),
                                 detokenize=self._detokenize)
        self.info = EngineInfo(self.args.served_name, cfg.num_layers, cfg.vocab_size, self.args.max_batch_size,
                               [policy.describe()] if len(policy.rules) > 1 else [policy.choose(1).describe()],
                               Limits(self.engine.capacity, cfg.vocab_size, self.args.default_max_new_tokens,
                                      self.args.max_prompt_chars, self.args.max_stop_strings))
        self.metrics = EngineMetrics()
        self.gpus = GpuMonitor()
        self.loop = EngineLoop(self.engine, on_step=self.metrics.observe_load).start()
        log.info("engine ready: %s on %s, %d threads, policy %s", self.args.model, device, threads, policy.describe())

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
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                if isinstance(batch[-1], Failed):
                    finished = True
                    error = batch[-1].error
                    raise InvalidArgument("prompt", str(error)) if isinstance(error, ValueError) else error
                token_ids = [t for event in batch for t in event.token_ids]
                now = time.perf_counter()
                self.metrics.observe_tokens(len(token_ids), now - last, first=len(text.tokens) == 0)
                last = now
                piece = text.push(token_ids)
                result = batch[-1].result
                if result is None:
                    yield Chunk(token_ids, piece, prompt_tokens=len(prompt_ids), completion_tokens=len(text.tokens))
                    continue
                finished = True
                final, _ = cut_at_stop(self._detokenize(result.token_ids), params.stop)
                stats = result.stats.to_dict(result.hierarchy or self.engine.hierarchy)
                self.metrics.observe_finished(result.finish_reason, len(prompt_ids), len(result.token_ids), stats,
                                              now - started)
                yield Chunk(token_ids, piece + text.finish(final), result.finish_reason, len(prompt_ids),
                            len(result.token_ids), stats)
        finally:
            if not finished:  # the caller went away (client disconnect, cancellation)
                self.loop.abort(request.request_id)

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
