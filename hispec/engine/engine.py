"""`SpecEngine`: the scheduler, a decider and an executor. One batched decoding loop for every
hierarchy depth (AR, LayerSkip, HiSpec, deeper), whatever runs the forwards (one process or a
pipeline of stage actors).

    engine = SpecEngine(model, Hierarchy(16, (2, 6), (1, 3)))        # one process, all layers
    engine = SpecEngine(executor, policy, config)                     # e.g. a PipelineExecutor
    results = engine.generate([Request(prompt_ids, 64)])
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import torch

from hispec.config import EngineConfig
from hispec.engine.executor import Executor, LocalExecutor
from hispec.engine.plan import KVSnapshot, StepResult
from hispec.engine.scheduler import ScheduledStep, Scheduler, attention_break_even
from hispec.kv.budget import KVLayout, available_memory, plan_kv_cache
from hispec.model.model import EarlyExitModel
from hispec.speculation.decisions import Decider
from hispec.speculation.hierarchy import BatchPolicy, Hierarchy
from hispec.speculation.rejection import RejectionSampler, Verdict
from hispec.speculation.request import GenerationResult, Request, StepOutput
from hispec.speculation.stats import RequestStats

log = logging.getLogger(__name__)


class SpecEngine:
    def __init__(
        self,
        model: EarlyExitModel | Executor,
        hierarchy: Hierarchy | BatchPolicy,
        config: EngineConfig = EngineConfig(),
        *,
        detokenize: Callable[[Sequence[int]], str] | None = None,
        verifier: RejectionSampler | None = None,
    ) -> None:
        self.policy = hierarchy if isinstance(hierarchy, BatchPolicy) else BatchPolicy.fixed(hierarchy)
        self.config = config
        if isinstance(model, EarlyExitModel):
            L = model.config.num_layers
            if model.layer_range != (0, L) or model.embed_tokens is None or model.lm_head is None:
                raise ValueError("the engine needs the whole model (all layers, embeddings and head)")
            self.model = model
            available = None if config.kv_cache_memory is not None else available_memory(model.device)
            layout = plan_kv_cache(model.config, config, model.dtype, available)
            executor = LocalExecutor([model], layout.num_slots, layout.capacity, layout.budget_bytes)
        else:
            self.model, executor = None, model
        cfg = self.model_config = executor.model_config
        if self.policy.choose(1).num_layers != cfg.num_layers:
            raise ValueError(f"hierarchy is for {self.policy.choose(1).num_layers} layers, the model has {cfg.num_layers}")
        self.executor = executor
        self.kv_layout = _engine_layout(executor, config)
        self.capacity = self.kv_layout.capacity  # tokens per sequence (prompt + new)
        self.num_slots = self.kv_layout.num_slots  # sequences decoded at once
        log.info("%s", self.kv_layout.describe())
        self.hierarchy = self.policy.choose(1)  # what a lone request gets
        self.scheduler = Scheduler(self.policy, config, vocab_size=cfg.vocab_size, capacity=self.capacity,
                                   num_slots=self.num_slots, eos_token_ids=cfg.eos_token_ids, detokenize=detokenize,
                                   attention_break_even=attention_break_even(cfg),
                                   ahead_layers=_ahead_layers(executor, config))
        self.decider = Decider(self.num_slots, cfg.vocab_size, verifier)
        self._callbacks: dict[str, Callable[[list[int]], None]] = {}

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, request: Request) -> str:
        """Queue a request; it joins the running batch at the next step with a free slot."""
        request_id = self.scheduler.add_request(request)
        if request.on_tokens is not None:
            self._callbacks[request_id] = request.on_tokens
        return request_id

    def abort(self, request_id: str) -> GenerationResult | None:
        """Drop a waiting or running request; its slot is freed at once."""
        self._callbacks.pop(request_id, None)
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_prefilling(self) -> int:
        """Running sequences whose prompt is still entering (chunked prefill)."""
        return len(self.scheduler.prefilling)

    @property
    def free_slots(self) -> list[int]:
        return self.scheduler.free_slots

    @property
    def forward_log(self):
        return self.scheduler.forward_log

    @property
    def total_stats(self) -> RequestStats:
        """Aggregate statistics of finished requests decoded with `self.hierarchy`."""
        return self.scheduler.lanes[self.hierarchy].total_stats

    def stats_by_hierarchy(self) -> dict[str, dict]:
        return {h.describe(): lane.total_stats.to_dict(h) for h, lane in self.scheduler.lanes.items()
                if lane.total_stats.requests}

    def generate(self, requests: Iterable[Request]) -> list[GenerationResult]:
        """Run requests to completion (batched); results in the order given."""
        order = [self.add_request(r) for r in requests]
        results: dict[str, GenerationResult] = {}
        with torch.inference_mode():
            while len(results) < len(order):
                for out in self.step():
                    if out.result is not None:
                        results[out.request_id] = out.result
        return [results[i] for i in order]

    # ---- the step ------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One engine step, in inference mode (entered here unless the caller already is:
        `generate` enters it once, not per step)."""
        if torch.is_inference_mode_enabled():
            return self._step()
        with torch.inference_mode():
            return self._step()

    def _step(self) -> list[StepOutput]:
        scheduled = self.scheduler.schedule()
        result = [] if scheduled.plan.empty else self.executor.execute(scheduled.plan)
        outputs = self.scheduler.apply(scheduled, self._decide(scheduled, result))
        if not self.scheduler.has_unfinished():
            self.sync()  # idle: release the last slots now, not with a next plan that may never come
        for out in outputs:  # side effects last, outside the model's path
            callback = self._callbacks.pop(out.request_id, None) if out.finished else self._callbacks.get(out.request_id)
            if callback is not None and out.new_token_ids:
                callback(out.new_token_ids)
        return outputs

    def _decide(self, scheduled: ScheduledStep, result: StepResult) -> list[Verdict]:
        verdicts = []
        for d in scheduled.decisions:
            head = result[d.forward][d.seq.slot]
            if d.ahead:  # the first stage decided it (greedy): an AheadOutput
                verdicts.append(head)
                continue
            verdicts.append(self.decider.decide(d.seq, d.level, d.prefill, head.argmax, head.logits))
        return verdicts

    # ---- consistency ---------------------------------------------------------------------
    def sync(self) -> None:
        """Send pending KV truncations and releases to the executor now (normally they ride along
        with the next step's plan)."""
        plan = self.scheduler.take_cache_ops()
        if not plan.empty:
            self.executor.execute(plan)

    def snapshot(self, with_tensors: bool = False) -> list[KVSnapshot]:
        """What every stage holds, after syncing (tests: lengths and KV against the scheduler)."""
        self.sync()
        return self.executor.snapshot(with_tensors)

    def check_lengths(self) -> None:
        """Every stage's KV lengths equal the scheduler's for every running sequence, and free
        slots hold nothing (raises AssertionError otherwise)."""
        snapshots = self.snapshot()
        running = {seq.slot: seq for seq in self.scheduler.running.values()}
        for snap in snapshots:
            lo, hi = snap.layer_range
            for slot, lengths in snap.lengths.items():
                seq = running.get(slot)
                expected = self.scheduler.expected_lengths(seq)[lo:hi] if seq else [0] * (hi - lo)
                if lengths != expected:
                    raise AssertionError(f"stage [{lo}, {hi}) slot {slot}: KV lengths {lengths}, scheduler expects {expected}")

    def close(self) -> None:
        self.executor.close()


def _engine_layout(executor: Executor, config: EngineConfig) -> KVLayout:
    """The part of the executor's KV cache the engine uses: at most max_batch_size of its slots and
    config's capacity. The executor's own layout (planned from the budget where the cache was made:
    here for a local model, by the pipeline for stage actors) says the bytes."""
    held: KVLayout | None = getattr(executor, "kv_layout", None)
    num_slots = min(config.max_batch_size, executor.num_slots)
    capacity = min(config.capacity(executor.model_config.max_position_embeddings), executor.capacity)
    if held is None:  # an executor that does not describe its cache (e.g. a test double)
        return KVLayout(num_slots, capacity, 0, 0)
    return KVLayout(num_slots, capacity, held.bytes_per_token, held.total_bytes, held.budget_bytes)


def _ahead_layers(executor: Executor, config: EngineConfig) -> int:
    """The layers where speculation ahead may run: the executor's first stage's, if it is on
    (EngineConfig.speculate_ahead; by default in pipelines, where it overlaps the deeper stages)."""
    first = getattr(executor, "first_stage_layers", 0)
    enabled = config.speculate_ahead
    if enabled is None:
        enabled = first < executor.model_config.num_layers  # more than one stage
    return first if enabled else 0
