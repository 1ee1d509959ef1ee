"""Shared pieces of the speculation-engine tests: tiny checkpoints and reference decoders."""

from __future__ import annotations

import queue
from pathlib import Path

import torch

from hispec.model import EarlyExitModel, load_model
from hispec.engine import EngineConfig, LocalExecutor, SpecEngine
from hispec.speculation import BatchPolicy, Hierarchy, Request, SamplingParams
from tests.unit.tiny_checkpoints import make_checkpoint

# Exits and budgets covering K = 0..3 on a 6-layer model, with budgets from 1 to 6.
GRID = [
    ((), ()),
    ((1,), (1,)), ((2,), (3,)), ((4,), (2,)), ((5,), (6,)),
    ((1, 3), (2, 4)), ((2, 4), (1, 1)), ((1, 5), (3, 2)), ((3, 4), (4, 5)),
    ((1, 2, 4), (1, 2, 3)), ((1, 3, 5), (2, 2, 2)), ((2, 3, 4), (3, 1, 4)),
]


def tiny_model(directory: Path, num_layers: int = 6, **kwargs) -> EarlyExitModel:
    make_checkpoint(directory, "tied-gqa", num_layers=num_layers, **kwargs)
    return load_model(directory)


def load_stages(model_dir: Path, split: tuple[int, ...]) -> list[EarlyExitModel]:
    """The checkpoint in `model_dir` as stage models over layers [split[i], split[i + 1]): the
    first with the embeddings; every one with the exit head (exits inside a stage use it)."""
    return [load_model(model_dir, layer_range=(lo, hi), with_embeddings=lo == 0) for lo, hi in zip(split, split[1:])]


def make_engine(model_dir: Path, hierarchy: Hierarchy | BatchPolicy, config: EngineConfig = EngineConfig(),
                split: tuple[int, ...] | None = None, **kw) -> SpecEngine:
    """A SpecEngine over the whole model in `model_dir` (split None) or over a LocalExecutor of
    stages loaded for the layer bounds `split`, e.g. (0, 2, 6) or (0, 1, 4, 6). `kw` go to SpecEngine."""
    if split is None:
        return SpecEngine(load_model(model_dir), hierarchy, config, **kw)
    stages = load_stages(model_dir, split)
    capacity = config.capacity(stages[0].config.max_position_embeddings)
    return SpecEngine(LocalExecutor(stages, config.max_batch_size, capacity), hierarchy, config, **kw)


def random_prompts(lengths, vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


def run_engine(model, exits, budgets, requests, **config) -> list:
    engine = SpecEngine(model, Hierarchy(model.config.num_layers, exits, budgets), EngineConfig(**config))
    return engine.generate(requests)


def make_requests(vocab: int) -> list[Request]:
    """Eight requests r0..r7 of mixed prompt lengths and lengths to generate (finishing at
    different steps), greedy and seeded sampled in turn, never stopping on a token."""
    lengths = (1, 9, 3, 14, 6, 2, 11, 5)
    max_new = (20, 7, 31, 3, 16, 25, 1, 12)
    prompts = random_prompts(lengths, vocab, seed=11)
    sampling = [SamplingParams() if i % 2 == 0 else SamplingParams(temperature=0.9, top_k=20, seed=i)
                for i in range(len(prompts))]
    return [Request(p, n, s, stop_token_ids=(), request_id=f"r{i}")
            for i, (p, n, s) in enumerate(zip(prompts, max_new, sampling))]


def run_with_arrivals(engine: SpecEngine, requests, every: int = 3, on_step=None) -> dict:
    """Add one request every `every` steps while the engine runs (sequences join and leave a
    running batch); returns the results by request id. `on_step(engine)` runs after each step."""
    results, pending, steps = {}, list(requests), 0
    while pending or engine.has_unfinished():
        if pending and steps % every == 0:
            engine.add_request(pending.pop(0))
        results |= {o.request_id: o.result for o in engine.step() if o.finished}
        if on_step is not None:
            on_step(engine)
        steps += 1
    return results


def requests_for(prompts, max_new_tokens, *, stop_token_ids=(), sampling=SamplingParams(), **kwargs) -> list[Request]:
    return [Request(p, max_new_tokens, sampling, stop_token_ids=stop_token_ids, **kwargs) for p in prompts]


@torch.inference_mode()
def first_draft_proposal(model: EarlyExitModel, ids: list[int], exit_layer: int) -> int:
    """The token the exit after `exit_layer` predicts after `ids` (what a draft proposes there)."""
    hidden = model.causal_hidden_states(torch.tensor([ids]), [exit_layer])[0]
    return int(model.exit_logits(hidden[0, -1]).argmax())


def collect(engine, request: Request) -> queue.Queue:
    """Submit to an EngineLoop or EngineProcess; its events land in the returned queue."""
    events: queue.Queue = queue.Queue()
    engine.submit(request, events.put)
    return events


def drain(events: queue.Queue, timeout: float = 60.0):
    """(tokens, result) of a finished stream, or (tokens so far, Failed) of a failed one."""
    from hispec.serving.engine_loop import Failed

    tokens = []
    while True:
        event = events.get(timeout=timeout)
        if isinstance(event, Failed):
            return tokens, event
        tokens += event.token_ids
        if event.result is not None:
            assert tokens == event.result.token_ids
            return tokens, event.result


@torch.inference_mode()
def fresh_forward(model: EarlyExitModel, tokens: list[int]):
    """(cache, hidden states): the KV of every layer and the hidden state [T, d] after every layer,
    from one forward over `tokens` from position 0 (what a stage's KV and rings must equal)."""
    cache = model.new_cache(num_slots=1, capacity=len(tokens))
    step = model.plan(cache, [0], len(tokens))
    hidden, per_layer = model.embed(torch.tensor([tokens])), []
    for layer in range(model.config.num_layers):
        hidden = model.forward_layers(hidden, step, cache, layer, layer + 1)
        per_layer.append(hidden[0])
    return cache, per_layer
