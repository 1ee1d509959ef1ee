"""Putting a pipelined engine together: where to cut (measured), the Ray side, the driver.

    with PipelinedEngine.start(model_path, policy, num_stages=2, config=EngineConfig(8)) as pipelined:
        results = pipelined.engine.generate(requests)
        pipelined.executor.stage_times()
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hispec.config import EngineConfig, ModelConfig
from hispec.engine.engine import SpecEngine
from hispec.pipeline.pipeline import Pipeline, PipelineExecutor, PipelineSpec, exits_of
from hispec.pipeline.split import max_stages, stage_bounds
from hispec.speculation.hierarchy import BatchPolicy


@torch.inference_mode()
def measure_layer_costs(model_path: Path, dtype: str = "float32", tokens: int = 4, context: int = 64,
                        repeats: int = 20) -> tuple[list[float], float]:
    """(seconds per layer, seconds of the final head) for a `tokens`-token step at `context`.
    Times layer 0 and the head on this machine; the layers of a Llama checkpoint share one shape,
    so layer 0's time stands for each of them."""
    from hispec.model import load_model

    config = ModelConfig.from_pretrained(model_path)
    model = load_model(model_path, layer_range=(0, 1), with_embeddings=True, with_head=True, dtype=dtype)
    cache = model.new_cache(num_slots=1, capacity=context + tokens + 1)
    hidden = torch.randn(1, context, config.hidden_size, dtype=model.dtype)
    model.forward_layers(hidden, model.plan(cache, [0], context), cache, 0, 1)
    x = torch.randn(1, tokens, config.hidden_size, dtype=model.dtype)
    layer, head = [], []
    for _ in range(repeats):
        step = model.plan(cache, [0], tokens)
        started = time.perf_counter()
        model.forward_layers(x, step, cache, 0, 1)
        layer.append(time.perf_counter() - started)
        cache.rollback((0, 1), [0], [context])
        started = time.perf_counter()
        model.exit_head(x)
        head.append(time.perf_counter() - started)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return [median(layer)] * config.num_layers, median(head)


def check_num_stages(policy: BatchPolicy, num_stages: int) -> None:
    """Raise ValueError unless `pipeline_spec` can cut the policy's model into `num_stages` stages."""
    L = policy.choose(1).num_layers
    deepest = max(exits_of(policy.hierarchies), default=None)
    most = max_stages(L, deepest)
    if not 1 <= num_stages <= most:
        why = (f"stage 0 holds layers [0, {deepest}), up to the deepest exit; each other stage at least one "
               f"of [{deepest}, {L})" if deepest else "at most one stage per layer")
        raise ValueError(f"{num_stages} stages: between 1 and {most} for this {L}-layer model ({why})")


def pipeline_spec(model_path: Path, policy: BatchPolicy, num_stages: int, num_slots: int, capacity: int, *,
                  dtype: str = "float32", device: str = "cpu", measure: bool = True, **kwargs) -> PipelineSpec:
    """Stage 0 ends at e_v (the deepest exit below the target of any hierarchy the policy uses),
    the deeper layers are split by measured cost. `num_slots`: the most sequences (max_batch_size);
    kwargs go to PipelineSpec, e.g. the KV budget (kv_cache_memory or kv_cache_memory_fraction),
    which decides how many of them the stages hold (Pipeline.create plans it)."""
    L = policy.choose(1).num_layers
    exits = exits_of(policy.hierarchies)
    costs, head = measure_layer_costs(model_path, dtype) if measure and num_stages > 1 else (None, 0.0)
    bounds = stage_bounds(L, num_stages, max(exits, default=None), costs, head)
    return PipelineSpec(model_path, bounds, num_slots, capacity, exits=exits, dtype=dtype, device=device, **kwargs)


@dataclass
class PipelinedEngine:
    """A SpecEngine over a pipeline this process drives (CLI, benchmarks, tests)."""

    pipeline: Pipeline
    executor: PipelineExecutor
    engine: SpecEngine

    @classmethod
    def start(cls, model_path: Path, policy: BatchPolicy, num_stages: int, config: EngineConfig = EngineConfig(), *,
              dtype: str = "float32", device: str = "cpu", detokenize=None, spec: PipelineSpec | None = None,
              **spec_kwargs) -> "PipelinedEngine":
        """Needs a Ray connection (ray.init) in this process."""
        if spec is None:
            max_positions = ModelConfig.from_pretrained(model_path).max_position_embeddings
            spec = pipeline_spec(model_path, policy, num_stages, config.max_batch_size, config.capacity(max_positions),
                                 dtype=dtype, device=device, kv_cache_memory=config.kv_cache_memory,
                                 kv_cache_memory_fraction=config.kv_cache_memory_fraction, **spec_kwargs)
        pipeline = Pipeline.create(spec)
        try:
            executor = PipelineExecutor(pipeline.connection)
        except BaseException:
            pipeline.shutdown()
            raise
        return cls(pipeline, executor, SpecEngine(executor, policy, config, detokenize=detokenize))

    def close(self) -> None:
        self.executor.close()
        self.pipeline.shutdown()

    def __enter__(self) -> "PipelinedEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
