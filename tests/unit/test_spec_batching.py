"""Iteration-level batching: sequences join and leave between steps, and each one's output is
exactly what it gets decoded alone (greedy and seeded sampling)."""

from __future__ import annotations

import pytest

from hispec.engine import EngineConfig, SpecEngine
from hispec.speculation import Hierarchy, Request
from hispec.model.greedy import greedy_generate
from tests.unit.spec_helpers import make_requests, random_prompts, tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny6"))


@pytest.mark.parametrize("exits,budgets", [((), ()), ((2,), (3,)), ((1, 3), (2, 4)), ((1, 2, 4), (2, 1, 3))])
def test_joins_and_leaves_equal_sequential(model, exits, budgets):
    hierarchy = Hierarchy(6, exits, budgets)
    requests = make_requests(model.config.vocab_size)
    alone = {}
    for request in requests:
        engine = SpecEngine(model, hierarchy, EngineConfig(max_batch_size=1))
        alone[request.request_id] = engine.generate([request])[0].token_ids

    engine = SpecEngine(model, hierarchy, EngineConfig(max_batch_size=3))
    streamed: dict[str, list[int]] = {r.request_id: [] for r in requests}
    results, pending, steps = {}, list(requests), 0
    while pending or engine.has_unfinished():
        if pending and steps % 3 == 0:  # a new request arrives every third step
            request = pending.pop(0)
            engine.add_request(Request(request.prompt_ids, request.max_new_tokens, request.sampling,
                                       stop_token_ids=(), request_id=request.request_id,
                                       on_tokens=streamed[request.request_id].extend))
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.result
        assert engine.num_running <= 3
        steps += 1
    assert {rid: r.token_ids for rid, r in results.items()} == alone
    assert streamed == alone  # streaming delivers exactly the committed tokens, in order
    assert sorted(engine.free_slots) == [0, 1, 2]  # every slot came back
    engine.check_lengths()  # nothing left in any KV slot
    assert all(not any(lengths) for snap in engine.snapshot() for lengths in snap.lengths.values())


def test_abort_frees_the_slot_and_spares_the_others(model):
    hierarchy = Hierarchy(6, (1, 3), (2, 4))
    requests = make_requests(model.config.vocab_size)[:4]
    expected = SpecEngine(model, hierarchy, EngineConfig(max_batch_size=4)).generate(requests)
    engine = SpecEngine(model, hierarchy, EngineConfig(max_batch_size=2))
    for r in requests:
        engine.add_request(r)
    engine.step()
    engine.step()
    aborted = engine.abort("r0")
    assert aborted.finish_reason == "abort" and aborted.token_ids == expected[0].token_ids[: len(aborted.token_ids)]
    assert engine.abort("r3").finish_reason == "abort"  # still waiting
    assert engine.abort("nope") is None
    results = {}
    while engine.has_unfinished():
        results |= {o.request_id: o.result for o in engine.step() if o.finished}
    assert results["r1"].token_ids == expected[1].token_ids and results["r2"].token_ids == expected[2].token_ids
    assert sorted(engine.free_slots) == [0, 1]


def test_bad_requests_are_refused_clearly(model):
    engine = SpecEngine(model, Hierarchy(6, (2,), (3,)))
    with pytest.raises(ValueError, match="prompt_ids"):
        Request([], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Request([1], -1)
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request(Request([5, model.config.vocab_size], 4))
    with pytest.raises(ValueError, match="detokenize"):
        engine.add_request(Request([5], 4, stop_strings=("x",)))
    engine.add_request(Request([5], 4, request_id="same"))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(Request([6], 4, request_id="same"))
    (result,) = [o.result for o in engine.step() if o.finished] or [None]
    assert result is None  # the good request is still decoding
    assert engine.generate([Request([7], 0)])[0].finish_reason == "length"


def test_batch_size_policy_gives_each_request_a_hierarchy_and_stays_exact(model):
    """Requests admitted alone speculate deeply; under load they get plain decoding. Lanes of
    different hierarchies decode side by side in one engine, every output still exact."""
    from hispec.model.greedy import greedy_generate
    from hispec.speculation import BatchPolicy

    hispec, layerskip, ar = Hierarchy(6, (1, 3), (2, 4)), Hierarchy(6, (2,), (3,)), Hierarchy(6)
    policy = BatchPolicy(((1, hispec), (2, layerskip), (None, ar)))
    assert [policy.choose(b) for b in (1, 2, 3, 9)] == [hispec, layerskip, ar, ar]
    engine = SpecEngine(model, policy, EngineConfig(max_batch_size=3))
    requests = make_requests(model.config.vocab_size)
    greedy = [r for r in requests if r.sampling.greedy]
    results, pending, steps = {}, list(greedy), 0
    while pending or engine.has_unfinished():
        if pending and steps % 4 == 0:
            engine.add_request(pending.pop(0))
        results |= {o.request_id: o.result for o in engine.step() if o.finished}
        steps += 1
    for request in greedy:
        expected, _ = greedy_generate(model, request.prompt_ids, request.max_new_tokens)
        assert results[request.request_id].token_ids == expected
    assert len(engine.stats_by_hierarchy()) >= 2  # more than one lane was used


def test_bad_policies():
    from hispec.speculation import BatchPolicy

    h = Hierarchy(6)
    for rules in [(), ((2, h), (1, h), (None, h)), ((2, h),), ((0, h), (None, h)), ((1, h), (None, Hierarchy(4)))]:
        with pytest.raises(ValueError):
            BatchPolicy(rules)


@pytest.mark.parametrize("exits,budgets", [((2,), (3,)), ((1, 3), (2, 4)), ((1, 2, 4), (2, 1, 3))])
def test_aligned_verification_runs_fewer_deep_forwards_with_the_same_output(model, exits, budgets):
    """Staggered greedy arrivals: with alignment the batch verifies together, so steps run fewer
    layers in all, and every output is still its plain greedy decoding."""
    hierarchy = Hierarchy(6, exits, budgets)
    prompts = random_prompts((3, 8, 2, 5, 7, 4), model.config.vocab_size, seed=5)
    outputs, deep = {}, {}
    for align in (False, True):
        engine = SpecEngine(model, hierarchy, EngineConfig(max_batch_size=6, align_verification=align))
        pending = [Request(p, 24, stop_token_ids=(), request_id=f"r{i}") for i, p in enumerate(prompts)]
        results, steps = {}, 0
        while pending or engine.has_unfinished():
            if pending and steps % 2 == 0:
                engine.add_request(pending.pop(0))
            results |= {o.request_id: o.result.token_ids for o in engine.step() if o.finished}
            steps += 1
        outputs[align] = results
        # weight passes: layers run per forward, summed (a step costs about the layers it runs)
        deep[align] = sum(shape.layers * n for shape, n in engine.forward_log.items() if not shape.prefill)
    reference = {f"r{i}": greedy_generate(model, p, 24)[0] for i, p in enumerate(prompts)}
    assert outputs[False] == outputs[True] == reference
    assert deep[True] < deep[False]


def test_pruned_draft_head_leaves_sampled_and_mixed_batches_exact(tmp_path):
    """EngineConfig.draft_vocab applies to greedy forwards below the target only: a batch that
    mixes greedy and seeded sampled requests gives the same outputs with and without it."""
    from hispec.model.greedy import greedy_generate
    from hispec.engine import EngineConfig, SpecEngine
    from hispec.speculation import Hierarchy, Request, SamplingParams
    from tests.unit.spec_helpers import random_prompts, tiny_model

    model = tiny_model(tmp_path)
    prompts = random_prompts((3, 7, 4, 9), model.config.vocab_size, seed=5)
    sampling = [SamplingParams(), SamplingParams(temperature=0.8, seed=11), SamplingParams(),
                SamplingParams(temperature=1.0, top_p=0.9, seed=3)]
    outputs = []
    for draft_vocab in (None, 30):
        engine = SpecEngine(model, Hierarchy(6, (1, 3), (2, 3)), EngineConfig(max_batch_size=4, draft_vocab=draft_vocab))
        outputs.append([r.token_ids for r in engine.generate([Request(p, 20, s) for p, s in zip(prompts, sampling)])])
    assert outputs[0] == outputs[1]
    assert outputs[1][0] == greedy_generate(model, prompts[0], 20)[0]
