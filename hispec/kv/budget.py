"""How many sequences the KV cache holds: planned from a memory budget before anything is allocated.

A sequence of at most `capacity` tokens (prompt + new) never runs its last token through the model,
so its slot holds K and V of every layer for capacity - 1 tokens, plus the scratch column that
padding tokens of a ragged batch write to (hispec.kv.cache.KVCache): one slot costs

    capacity x bytes_per_token,   bytes_per_token = 2 (K, V) x layers x kv_heads x head_dim x itemsize

and the cache holds min(max_batch_size, budget // that) sequences. A Llama-2-7B checkpoint in
float16 (32 layers, 32 KV heads of 128) takes 0.5 MiB per token: 64 slots of its 4,096-token
context would be 128 GiB (~137 GB), so the budget, not max_batch_size, must decide.

    layout = plan_kv_cache(model_config, EngineConfig(kv_cache_memory=8 << 30), torch.float16, None)
    layout.num_slots, layout.capacity        # sequences, tokens per sequence
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hispec.config import EngineConfig, ModelConfig

MiB = 1 << 20


@dataclass(frozen=True)
class KVLayout:
    """What the KV cache holds: `num_slots` sequences of at most `capacity` tokens each."""

    num_slots: int
    capacity: int  # tokens per sequence (prompt + new): capacity - 1 in the KV, plus the scratch column
    bytes_per_token: int  # K and V of every layer for one token (one column of a slot)
    total_bytes: int  # what the cache allocates: num_slots x capacity x bytes_per_token as planned
    budget_bytes: int | None = None  # what it was planned within (None: not planned from a budget)

    @property
    def bytes_per_slot(self) -> int:
        return self.capacity * self.bytes_per_token

    def describe(self) -> str:
        """`KV cache: N sequences x C tokens, X MiB (budget Y MiB)` (the parts it knows)."""
        size = f", {self.total_bytes / MiB:.0f} MiB" if self.total_bytes else ""
        budget = "" if self.budget_bytes is None else f" (budget {self.budget_bytes / MiB:.0f} MiB)"
        return f"KV cache: {self.num_slots} sequences x {self.capacity} tokens{size}{budget}"


def kv_bytes_per_token(model_config: ModelConfig, dtype: torch.dtype, num_layers: int | None = None) -> int:
    """Bytes of K and V for one token in `num_layers` layers (default: all of the model's)."""
    layers = model_config.num_layers if num_layers is None else num_layers
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * layers * model_config.num_key_value_heads * model_config.head_dim * itemsize


def plan_kv_cache(model_config: ModelConfig, engine_config: EngineConfig, dtype: torch.dtype,
                  available_bytes: int | None) -> KVLayout:
    """The KV layout `engine_config`'s budget allows: capacity = engine_config.capacity(context)
    tokens per sequence, num_slots = min(max_batch_size, budget // bytes per slot).

    `available_bytes`: the device memory free now, for a budget by fraction (model-wide: for a
    pipeline, see `pipeline_available_bytes`); unused when kv_cache_memory is set.
    Raises ValueError when not even one sequence fits, saying what to lower."""
    capacity = engine_config.capacity(model_config.max_position_embeddings)
    per_token = kv_bytes_per_token(model_config, dtype)
    per_slot = capacity * per_token  # capacity - 1 tokens' KV + the scratch column
    budget = engine_config.kv_budget(available_bytes)
    fits = budget // per_slot
    if fits < 1:
        source = (f"kv_cache_memory {budget} bytes" if engine_config.kv_cache_memory is not None else
                  f"{budget} bytes ({engine_config.kv_cache_memory_fraction or 'the default fraction'} of "
                  f"{available_bytes} bytes available)")
        raise ValueError(
            f"the KV cache budget, {source} = {budget / MiB:.1f} MiB, does not hold one sequence of {capacity} "
            f"tokens ({per_slot / MiB:.1f} MiB: {capacity} columns x {per_token} bytes per token over "
            f"{model_config.num_layers} layers); lower max_context or raise the budget "
            f"(kv_cache_memory / kv_cache_memory_fraction)")
    num_slots = min(engine_config.max_batch_size, fits)
    return KVLayout(num_slots, capacity, per_token, num_slots * per_slot, budget)


def pipeline_available_bytes(stage_ranges: Sequence[tuple[int, int]], stage_available: Sequence[int],
                             stage_pools: Sequence[Hashable] | None = None) -> int:
    """The model-wide `available_bytes` for `plan_kv_cache` of a pipeline whose stage s holds layers
    stage_ranges[s] on a device with stage_available[s] bytes free. Every layer's KV is the same
    size, so a stage takes its layers' share of the budget. Stages drawing on one memory pool
    (stage_pools[s] equal: e.g. CPU stages on one node; default: each its own) share its memory:
    the budget is bounded by the pool with the least room per layer it holds."""
    num_layers = stage_ranges[-1][1] - stage_ranges[0][0]
    pools = list(range(len(stage_ranges))) if stage_pools is None else list(stage_pools)
    layers: dict[Hashable, int] = {}
    free: dict[Hashable, int] = {}
    for (lo, hi), available, pool in zip(stage_ranges, stage_available, pools, strict=True):
        layers[pool] = layers.get(pool, 0) + hi - lo
        free[pool] = min(free.get(pool, available), available)  # measured at about the same time
    return min(free[pool] * num_layers // layers[pool] for pool in layers)


def available_memory(device: torch.device | str) -> int:
    """Bytes free on `device` now: CUDA from the driver (torch.cuda.mem_get_info), CPU from the
    kernel's estimate of memory available without swapping (/proc/meminfo MemAvailable)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        raise ValueError(f"no way to read the free memory of device {device}")
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    try:
        import psutil
    except ImportError as error:
        raise RuntimeError("cannot read the available memory (no /proc/meminfo, no psutil): set kv_cache_memory") from error
    return int(psutil.virtual_memory().available)
