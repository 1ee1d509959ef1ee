"""Shared pieces of the speculation-engine tests: tiny checkpoints and reference decoders."""

from __future__ import annotations

import queue
from pathlib import Path

import torch

from hispec.model import EarlyExitModel, load_model
from hispec.engine import EngineConfig, SpecEngine
from hispec.speculation import Hierarchy, Request, SamplingParams
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


def random_prompts(lengths, vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


def run_engine(model, exits, budgets, requests, **config) -> list:
    engine = SpecEngine(model, Hierarchy(model.config.num_layers, exits, budgets), EngineConfig(**config))
    return engine.generate(requests)


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
