"""Executors run a `StepPlan` and answer its head outputs. The engine sees only this interface:

    LocalExecutor([model])               one process, one stage over all layers (the default)
    LocalExecutor(stage_models)          one process, a pipeline of stages (tests the split without Ray)
    hispec.pipeline.PipelineExecutor     stage actors on Ray, rows over gloo / NCCL

The same engine tests run through all of them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Protocol

import torch

from hispec.config import ModelConfig
from hispec.engine.plan import KVSnapshot, StepPlan, StepResult
from hispec.engine.stage import Stage, run_stage_plan
from hispec.kv.budget import KVLayout
from hispec.model.model import EarlyExitModel


class ExecutorFailure(RuntimeError):
    """The executor cannot run any more steps (e.g. a pipeline stage died): every request it held
    is lost, and the engine must be rebuilt on a new executor."""


class Executor(Protocol):
    model_config: ModelConfig
    num_slots: int  # sequences its KV cache holds
    capacity: int  # tokens per sequence
    # Optional: `kv_layout: KVLayout`, what the cache holds and takes in bytes (SpecEngine reports it).

    def execute(self, plan: StepPlan) -> StepResult:
        """Run `plan`; per forward, the head outputs by slot."""
        ...

    def snapshot(self, with_tensors: bool = False) -> list[KVSnapshot]:
        """What every stage holds (between steps; for consistency checks)."""
        ...

    def close(self) -> None: ...


class _QueueLink:
    """Hidden rows between two stages of one process: what stage s sends, stage s + 1 receives."""

    def __init__(self, inbox: deque | None, outbox: deque | None) -> None:
        self.inbox, self.outbox = inbox, outbox

    def send(self, hidden: torch.Tensor) -> None:
        # A copy, as a transport would make: the rows may be a view of a ring that this stage
        # overwrites before the next stage runs (speculation ahead writes past the sent window).
        self.outbox.append(hidden.clone())

    def recv(self, shape, dtype, device) -> torch.Tensor:
        hidden = self.inbox.popleft()
        if tuple(hidden.shape) != tuple(shape):
            raise RuntimeError(f"expected rows of shape {tuple(shape)}, got {tuple(hidden.shape)}")
        return hidden


class LocalExecutor:
    """Stages in one process, run one after the other on each plan (a stage never needs a later
    stage's output within a step: rows only flow to deeper layers)."""

    def __init__(self, models: Sequence[EarlyExitModel], num_slots: int, capacity: int,
                 budget_bytes: int | None = None) -> None:
        """`num_slots` sequences of `capacity` tokens in every stage's cache (plan them with
        hispec.kv.budget.plan_kv_cache; `budget_bytes`: the budget they were planned within)."""
        models = list(models)
        bounds = [m.layer_range for m in models]
        L = models[0].config.num_layers
        if bounds[0][0] != 0 or bounds[-1][1] != L or any(a[1] != b[0] for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"stages must cover layers [0, {L}) in order, got {bounds}")
        if models[0].embed_tokens is None or models[-1].lm_head is None:
            raise ValueError("the first stage needs the embeddings and the last the head")
        self.model_config = models[0].config
        self.num_slots, self.capacity = num_slots, capacity
        self.stages = [Stage(m, num_slots, capacity) for m in models]
        self.first_stage_layers = self.stages[0].hi  # where speculation ahead can run
        self.kv_layout = KVLayout(num_slots, capacity, sum(s.cache.bytes_per_token for s in self.stages),
                                  sum(s.cache.nbytes for s in self.stages), budget_bytes)
        queues = [deque() for _ in range(len(models) - 1)]
        self._links = [_QueueLink(queues[i - 1] if i else None, queues[i] if i < len(queues) else None)
                       for i in range(len(models))]

    def execute(self, plan: StepPlan) -> StepResult:
        result: StepResult = [{} for _ in range(len(plan.forwards) + len(plan.aheads))]
        for stage, link in zip(self.stages, self._links):
            for i, heads in run_stage_plan(stage, plan, link).items():
                result[i].update(heads)
        return result

    def snapshot(self, with_tensors: bool = False) -> list[KVSnapshot]:
        return [stage.snapshot(with_tensors) for stage in self.stages]

    def close(self) -> None:
        pass
