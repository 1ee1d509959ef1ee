"""After any sequence of accept/reject steps, every stage's KV cache (and every exit's ring of
unverified hidden states) equals a fresh forward over the tokens it is supposed to hold, whether
the model runs as one stage or split into several."""

from __future__ import annotations

import pytest
import torch

from hispec.engine import EngineConfig
from hispec.engine.plan import RingKey
from hispec.speculation import Hierarchy, Request, SamplingParams
from tests.unit.spec_helpers import fresh_forward, make_engine, random_prompts


def check_against_fresh(engine, model, hierarchy: Hierarchy) -> int:
    """Compare every stage's KV and rings with fresh forwards; returns the ring rows checked."""
    snapshots = engine.snapshot(with_tensors=True)
    W, checks = hierarchy.window, 0
    level_of = {layer: k for k in range(hierarchy.depth + 1) for layer in range(*hierarchy.layer_range(k))}
    for seq in engine.scheduler.running.values():
        cache, hidden = fresh_forward(model, seq.tokens)
        for snap in snapshots:
            lo, hi = snap.layer_range
            for layer in range(lo, hi):
                n = seq.fed[level_of[layer]]  # level k's layers hold seq.fed[k] tokens
                assert snap.lengths[seq.slot][layer - lo] == n
                k_ref, v_ref = (t[:, :n] for t in cache.slot_tensors(layer, 0))
                torch.testing.assert_close(snap.keys[seq.slot][layer - lo], k_ref, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(snap.values[seq.slot][layer - lo], v_ref, atol=1e-5, rtol=1e-4)
            for k in range(hierarchy.depth):  # unverified hidden states at exit e_k, on the stage that owns it
                exit = hierarchy.bounds[k + 1]
                if not lo < exit <= hi:
                    continue
                for pos in range(seq.fed[k + 1], seq.fed[k]):
                    ring = snap.rings[RingKey(exit, W)]
                    torch.testing.assert_close(ring[seq.slot, pos % W], hidden[exit - 1][pos], atol=1e-5, rtol=1e-4)
                    checks += 1
    return checks


@pytest.mark.parametrize("split", [None, (0, 3, 6), (0, 1, 4, 6)], ids=["whole", "split-3", "split-1-4"])
@pytest.mark.parametrize("exits,budgets", [((2,), (3,)), ((1, 3), (2, 4)), ((1, 2, 4), (1, 2, 3))])
def test_cache_matches_fresh_forward_after_every_step(model_dir, model, exits, budgets, split):
    hierarchy = Hierarchy(6, exits, budgets)
    engine = make_engine(model_dir, hierarchy, EngineConfig(max_batch_size=4), split)
    prompts = random_prompts((1, 6, 3, 10), model.config.vocab_size, seed=5)
    samplings = [SamplingParams(), SamplingParams(temperature=1.0, seed=1),
                 SamplingParams(temperature=0.7, top_p=0.9, seed=2), SamplingParams()]
    for p, s in zip(prompts, samplings):
        engine.add_request(Request(p, 24, s, stop_token_ids=()))
    rejections, checks = 0, 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                target = out.result.stats.levels[-1]
                rejections += target.proposed - target.accepted
        engine.check_lengths()
        checks += check_against_fresh(engine, model, hierarchy)
    assert rejections > 0 and checks > 0  # rollbacks and buffered states were both exercised
    engine.check_lengths()  # every slot empty at the end
    assert all(not any(lengths) for snap in engine.snapshot() for lengths in snap.lengths.values())
