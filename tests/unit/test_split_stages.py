"""The engine over a pipeline of stages in one process (LocalExecutor over stage models): every
plan crosses stage boundaries (hidden rows handed on, rings read on the stage that owns them,
truncations and releases applied per stage), and the output is exactly the single-stage one."""

from __future__ import annotations

import pytest

from hispec.errors import InvalidRequest

from hispec.engine import EngineConfig
from hispec.model.greedy import greedy_generate
from hispec.speculation import Hierarchy, Request, SamplingParams
from tests.unit.spec_helpers import (GRID, first_draft_proposal, make_engine, make_requests, random_prompts,
                                     requests_for, run_with_arrivals)

PROMPT_LENGTHS = (1, 2, 5, 11, 17)
NEW_TOKENS = 33
SPLITS = [(0, 3, 6), (0, 2, 3, 5, 6)]
SOME = [((2,), (3,)), ((1, 3), (2, 4)), ((1, 2, 4), (1, 2, 3))]  # K = 1..3, exits on and off stage bounds

split_ids = ["-".join(map(str, s)) for s in SPLITS]
grid_ids = [f"e{e}-n{n}" for e, n in GRID]
some_ids = [f"e{e}-n{n}" for e, n in SOME]


@pytest.fixture(scope="module")
def prompts(model):
    return random_prompts(PROMPT_LENGTHS, model.config.vocab_size)


@pytest.fixture(scope="module")
def reference(model, prompts):
    return [greedy_generate(model, p, NEW_TOKENS)[0] for p in prompts]


def engine_for(model_dir, exits, budgets, split, **config):
    return make_engine(model_dir, Hierarchy(6, exits, budgets), EngineConfig(**config), split)


def test_stages_are_split(model_dir):
    engine = engine_for(model_dir, (1, 3), (2, 4), SPLITS[1])
    assert [s.lo for s in engine.executor.stages] == [0, 2, 3, 5] and engine.model is None


@pytest.mark.parametrize("split", SPLITS, ids=split_ids)
@pytest.mark.parametrize("exits,budgets", GRID, ids=grid_ids)
def test_equals_greedy(model_dir, prompts, reference, exits, budgets, split):
    # 5 prompts through 3 slots: sequences join as others finish
    engine = engine_for(model_dir, exits, budgets, split, max_batch_size=3)
    results = engine.generate(requests_for(prompts, NEW_TOKENS))
    assert [r.token_ids for r in results] == reference
    assert all(r.finish_reason == "length" for r in results)
    engine.check_lengths()


@pytest.mark.parametrize("split", SPLITS, ids=split_ids)
@pytest.mark.parametrize("exits,budgets", [((), ()), *SOME], ids=["ar", *some_ids])
def test_seeded_sampling_equals_single_stage(model_dir, prompts, exits, budgets, split):
    requests = [Request(p, 24, SamplingParams(temperature=0.8, top_p=0.9, seed=seed), stop_token_ids=())
                for p, seed in zip(prompts, (0, 1, 7, 42, 2**40))]
    single = engine_for(model_dir, exits, budgets, None, max_batch_size=3).generate(requests)
    staged = engine_for(model_dir, exits, budgets, split, max_batch_size=3).generate(requests)
    assert [r.token_ids for r in staged] == [r.token_ids for r in single]
    assert len({tuple(r.token_ids) for r in single}) == len(prompts)


@pytest.mark.parametrize("split", SPLITS, ids=split_ids)
@pytest.mark.parametrize("exits,budgets", SOME, ids=some_ids)
def test_eos_inside_drafts(model, model_dir, prompts, reference, exits, budgets, split):
    """EOS as the token the draft proposes first (rejected or accepted) and as one the target
    emits early or late; each prompt with its own stop token, all in one batch."""
    choices = {
        "drafted": [first_draft_proposal(model, p + ref[:1], exits[0]) for p, ref in zip(prompts, reference)],
        "early": [ref[3] for ref in reference],
        "late": [ref[10] for ref in reference],
    }
    for kind, stops in choices.items():
        requests = [Request(p, NEW_TOKENS, stop_token_ids=(eos,)) for p, eos in zip(prompts, stops)]
        expected = [greedy_generate(model, p, NEW_TOKENS, (eos,)) for p, eos in zip(prompts, stops)]
        results = engine_for(model_dir, exits, budgets, split, max_batch_size=3).generate(requests)
        assert [(r.token_ids, r.finish_reason) for r in results] == expected, kind
        assert any(reason == "stop" for _, reason in expected)


@pytest.mark.parametrize("split", SPLITS, ids=split_ids)
@pytest.mark.parametrize("exits,budgets", [((2,), (6,)), ((1, 3), (3, 5)), ((1, 2, 4), (2, 3, 4))])
def test_max_new_tokens_mid_window(model_dir, prompts, reference, exits, budgets, split):
    lengths = (1, 2, 3, 5, 8, 13)
    requests = [Request(p, n, stop_token_ids=()) for p in prompts for n in lengths]
    results = engine_for(model_dir, exits, budgets, split, max_batch_size=4).generate(requests)
    assert [r.token_ids for r in results] == [ref[:n] for ref in reference for n in lengths]
    assert all(r.finish_reason == "length" for r in results)


@pytest.mark.parametrize("split", SPLITS, ids=split_ids)
def test_one_token_prompts(model, model_dir, split):
    prompts = [[0], [5], [model.config.vocab_size - 1], [42]]
    expected = [greedy_generate(model, p, 20)[0] for p in prompts]
    for exits, budgets in [((), ()), *SOME]:
        results = engine_for(model_dir, exits, budgets, split, max_batch_size=2).generate(requests_for(prompts, 20))
        assert [r.token_ids for r in results] == expected


@pytest.mark.parametrize("split", SPLITS, ids=split_ids)
def test_context_limit(model, model_dir, split):
    """max_context 24: prompt + new tokens <= 24; a request asking for more is refused, naming the field."""
    prompts = random_prompts((1, 5, 20, 23), model.config.vocab_size, seed=3)
    expected = [(greedy_generate(model, p, 24 - len(p))[0], "length") for p in prompts]
    for exits, budgets in [((), ()), *SOME, ((5,), (6,))]:
        engine = engine_for(model_dir, exits, budgets, split, max_batch_size=4, max_context=24)
        assert engine.executor.capacity == 24
        results = engine.generate([Request(p, 24 - len(p), stop_token_ids=()) for p in prompts])
        assert [(r.token_ids, r.finish_reason) for r in results] == expected
    with pytest.raises(InvalidRequest, match="leaves no room"):
        engine.add_request(Request(list(range(24)), 5))
    with pytest.raises(InvalidRequest, match="max_new_tokens"):
        engine.add_request(requests_for(prompts[:1], 40)[0])


@pytest.mark.parametrize("split", SPLITS, ids=split_ids)
def test_abort_mid_generation_empties_the_slot(model_dir, split):
    hierarchy = Hierarchy(6, (1, 3), (2, 4))
    requests = make_requests(101)[:4]
    expected = {r.request_id: r.token_ids
                for r in make_engine(model_dir, hierarchy, EngineConfig(max_batch_size=4)).generate(requests)}
    engine = make_engine(model_dir, hierarchy, EngineConfig(max_batch_size=2), split)
    for r in requests:
        engine.add_request(r)
    for _ in range(3):
        engine.step()
    slot = engine.scheduler.running["r0"].slot
    aborted = engine.abort("r0")
    assert aborted.finish_reason == "abort" and aborted.token_ids == expected["r0"][: len(aborted.token_ids)]
    assert aborted.token_ids  # it was mid-generation
    engine.check_lengths()  # every stage: the aborted slot holds nothing, the others what the scheduler says
    assert all(not any(snap.lengths[slot]) for snap in engine.snapshot())
    assert engine.abort("r3").finish_reason == "abort"  # still waiting
    results = {}
    while engine.has_unfinished():
        results |= {o.request_id: o.result for o in engine.step() if o.finished}
        engine.check_lengths()
    assert {rid: r.token_ids for rid, r in results.items()} == {"r1": expected["r1"], "r2": expected["r2"]}
    assert sorted(engine.free_slots) == [0, 1]


@pytest.mark.parametrize("split", SPLITS, ids=split_ids)
@pytest.mark.parametrize("exits,budgets", [((), ()), *SOME], ids=["ar", *some_ids])
def test_joins_and_leaves_equal_single_stage(model_dir, exits, budgets, split):
    """Greedy and seeded sampled requests arrive every second step into 3 slots and finish at
    different steps: each output equals the single-stage engine's, streamed exactly."""
    requests = make_requests(101)
    expected = {r.request_id: r.token_ids for r in engine_for(model_dir, exits, budgets, None, max_batch_size=8).generate(requests)}
    streamed: dict[str, list[int]] = {r.request_id: [] for r in requests}
    arriving = [Request(r.prompt_ids, r.max_new_tokens, r.sampling, stop_token_ids=(), request_id=r.request_id,
                        on_tokens=streamed[r.request_id].extend) for r in requests]
    engine = engine_for(model_dir, exits, budgets, split, max_batch_size=3)
    results = run_with_arrivals(engine, arriving, every=2, on_step=lambda e: e.check_lengths())
    assert {rid: r.token_ids for rid, r in results.items()} == expected == streamed
    assert sorted(engine.free_slots) == [0, 1, 2]
    assert all(not any(lengths) for snap in engine.snapshot() for lengths in snap.lengths.values())


@pytest.mark.parametrize("split", [None, SPLITS[0]], ids=["whole", split_ids[0]])
def test_cache_ops_of_a_step_without_forwards_reach_the_stages(model_dir, split):
    """r0 finishes in slot 0 while r1 (nothing to generate) waits for a slot; the next step only
    admits r1 (finished at once, no forward), so its plan is r0's release alone."""
    engine = engine_for(model_dir, (2,), (3,), split, max_batch_size=1)
    engine.generate([Request([1, 2, 3], 3, stop_token_ids=()), Request([4], 0)])
    engine.check_lengths()  # slot 0 still holds r0's KV when the release was dropped
