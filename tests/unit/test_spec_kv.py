"""After any sequence of accept/reject steps, every layer's KV cache (and every exit's buffer
of unverified hidden states) equals a fresh forward over the tokens it is supposed to hold."""

from __future__ import annotations

import pytest
import torch

from hispec.engine import EngineConfig, SpecEngine
from hispec.speculation import Hierarchy, Request, SamplingParams
from tests.unit.spec_helpers import random_prompts, tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny6"))


@torch.inference_mode()
def fresh(model, tokens: list[int]):
    """KV of every layer and the hidden state after every layer, from one forward over `tokens`."""
    cache = model.new_cache(num_slots=1, capacity=len(tokens))
    step = model.plan(cache, [0], len(tokens))
    hidden, per_layer = model.embed(torch.tensor([tokens])), []
    for layer in range(model.config.num_layers):
        hidden = model.forward_layers(hidden, step, cache, layer, layer + 1)
        per_layer.append(hidden[0])
    return cache, per_layer


@pytest.mark.parametrize("exits,budgets", [((2,), (3,)), ((1, 3), (2, 4)), ((1, 2, 4), (1, 2, 3))])
def test_cache_matches_fresh_forward_after_every_step(model, exits, budgets):
    hierarchy = Hierarchy(6, exits, budgets)
    engine = SpecEngine(model, hierarchy, EngineConfig(max_batch_size=4))
    prompts = random_prompts((1, 6, 3, 10), model.config.vocab_size, seed=5)
    samplings = [SamplingParams(), SamplingParams(temperature=1.0, seed=1),
                 SamplingParams(temperature=0.7, top_p=0.9, seed=2), SamplingParams()]
    for p, s in zip(prompts, samplings):
        engine.add_request(Request(p, 24, s, stop_token_ids=()))
    rejections, checks = 0, 0
    while engine.has_unfinished():
        engine.step()
        for seq in engine.running.values():
            rejections += seq.stats.levels[-1].proposed - seq.stats.levels[-1].accepted
            cache, hidden = fresh(model, seq.tokens)
            for level in range(hierarchy.depth + 1):
                lo, hi = hierarchy.layer_range(level)
                for layer in range(lo, hi):
                    assert engine.cache.length(layer, seq.slot) == seq.fed[level]
                    k, v = engine.cache.slot_tensors(layer, seq.slot)
                    k_ref, v_ref = (t[:, : seq.fed[level]] for t in cache.slot_tensors(layer, 0))
                    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-4)
                    torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-4)
                if level < hierarchy.depth:  # unverified hidden states at this level's exit
                    W = hierarchy.window
                    for pos in range(seq.fed[level + 1], seq.fed[level]):
                        torch.testing.assert_close(engine.hidden_rings[level][seq.slot, pos % W],
                                                   hidden[hi - 1][pos], atol=1e-5, rtol=1e-4)
                        checks += 1
    assert rejections > 0 and checks > 0  # rollbacks and buffered states were both exercised
