"""Speculation ahead (hispec.engine.ahead): the first stage drafts and verifies a whole window below
the target on its own, ahead of the target's verdict on the previous one. Whatever it speculates,
the output is plain greedy decoding; a window the verdict makes stale is never applied, and every
stage's KV matches what the scheduler expects after every step.

Through one process (the whole model, ahead forced on) and through two in-process stages (where it
is on by default); tests/integration/test_pipeline.py runs it through stage actors. `model_dir` and
`model` (a tiny 6-layer checkpoint) come from tests/unit/conftest.py."""

from __future__ import annotations

import pytest

from hispec.engine import EngineConfig, SpecEngine
from hispec.model.greedy import greedy_generate
from hispec.speculation import Hierarchy, Request
from tests.unit.spec_helpers import (
    GRID, first_draft_proposal, make_engine, make_requests, random_prompts, requests_for, tiny_model,
)

NEW_TOKENS = 33
# Hierarchies of 1 or 2 levels below the target whose levels below it fit the first stage [0, 4)
AHEAD_GRID = [(e, n) for e, n in GRID if len(e) in (1, 2) and e[-1] <= 4]
SPLIT = (0, 4, 6)


@pytest.fixture(scope="module")
def prompts(model):
    return random_prompts((1, 2, 5, 11, 17), model.config.vocab_size)


@pytest.fixture(scope="module")
def reference(model, prompts):
    return [greedy_generate(model, p, NEW_TOKENS)[0] for p in prompts]


def engines(model, model_dir, hierarchy, **config):
    """The same engine through one process (ahead forced on) and two in-process stages (default)."""
    yield "one process", SpecEngine(model, hierarchy, EngineConfig(speculate_ahead=True, **config))
    yield "two stages", make_engine(model_dir, hierarchy, EngineConfig(**config), split=SPLIT)


def run_checked(engine: SpecEngine, requests) -> dict:
    """Run to completion, checking every stage's KV lengths after every step; results by id."""
    for r in requests:
        engine.add_request(r)
    results = {}
    while engine.has_unfinished():
        results |= {o.request_id: o.result for o in engine.step() if o.finished}
        engine.check_lengths()
    return results


@pytest.mark.parametrize("exits,budgets", AHEAD_GRID, ids=[f"e{e}-n{n}" for e, n in AHEAD_GRID])
def test_equals_greedy_with_kv_consistent_after_every_step(model, model_dir, prompts, reference, exits, budgets):
    for where, engine in engines(model, model_dir, Hierarchy(6, exits, budgets), max_batch_size=3):
        requests = requests_for(prompts, NEW_TOKENS)
        results = run_checked(engine, requests)
        assert [results[r.request_id].token_ids for r in requests] == reference, where
        scheduler = engine.scheduler
        # Both outcomes happened: next windows kept, and stale ones dropped (never applied: the
        # output above is greedy's and the KV lengths held after every step).
        assert scheduler.aheads_kept > 0 and scheduler.aheads_dropped > 0, where
        assert scheduler.ahead_layers == (6 if where == "one process" else 4)


def test_off_by_default_in_one_process(model, model_dir):
    hierarchy = Hierarchy(6, (1, 3), (2, 4))
    assert SpecEngine(model, hierarchy).scheduler.ahead_layers == 0
    assert make_engine(model_dir, hierarchy, split=SPLIT).scheduler.ahead_layers == 4
    assert make_engine(model_dir, hierarchy, EngineConfig(speculate_ahead=False), split=SPLIT).scheduler.ahead_layers == 0
    # levels below the target beyond the first stage: the scheduler's own steps
    engine = make_engine(model_dir, Hierarchy(6, (1, 5), (3, 2)), split=SPLIT)
    engine.generate(requests_for(random_prompts((4,), 101), 12))
    assert engine.scheduler.aheads_kept == engine.scheduler.aheads_dropped == 0


@pytest.mark.parametrize("exits,budgets", [((2,), (3,)), ((1, 3), (2, 4)), ((2, 4), (1, 1))])
@pytest.mark.parametrize("max_new", [1, 2, 3, 5, 8])
def test_max_new_tokens_inside_a_window(model, model_dir, prompts, reference, exits, budgets, max_new):
    for where, engine in engines(model, model_dir, Hierarchy(6, exits, budgets)):
        results = engine.generate(requests_for(prompts, max_new))
        assert [r.token_ids for r in results] == [ref[:max_new] for ref in reference], where
        assert all(r.finish_reason == "length" for r in results)


@pytest.mark.parametrize("exits,budgets", [((1,), (1,)), ((2,), (3,)), ((1, 3), (2, 4))])
def test_eos_inside_a_window(model, model_dir, prompts, reference, exits, budgets):
    """EOS where the draft proposes it first, and where the target emits it mid-window."""
    for prompt, ref in zip(prompts[:3], reference[:3]):
        drafted = first_draft_proposal(model, prompt + ref[:1], exits[0])
        for eos in {drafted, ref[3], ref[10]}:
            expected = greedy_generate(model, prompt, NEW_TOKENS, (eos,))
            for where, engine in engines(model, model_dir, Hierarchy(6, exits, budgets)):
                (result,) = engine.generate(requests_for([prompt], NEW_TOKENS, stop_token_ids=(eos,)))
                assert (result.token_ids, result.finish_reason) == expected, (where, eos)


def test_context_limit_inside_a_window(tmp_path):
    model = tiny_model(tmp_path, max_position_embeddings=24)
    prompts = random_prompts((1, 5, 20, 23), model.config.vocab_size, seed=3)
    expected = [greedy_generate(model, p, 24 - len(p))[0] for p in prompts]
    for exits, budgets in [((2,), (5,)), ((1, 3), (3, 4))]:
        for where, engine in engines(model, tmp_path, Hierarchy(6, exits, budgets)):
            results = engine.generate([Request(p, 24 - len(p), stop_token_ids=()) for p in prompts])
            assert [r.token_ids for r in results] == expected, where


def test_sampled_sequences_beside_greedy_ones_are_unchanged(model, model_dir):
    """Seeded sampled requests take the scheduler's own steps in the same batch: with or without
    speculation ahead for the greedy ones, every request's output is the same."""
    hierarchy = Hierarchy(6, (1, 3), (2, 4))
    expected = make_engine(model_dir, hierarchy, EngineConfig(max_batch_size=4, speculate_ahead=False),
                           split=SPLIT).generate(make_requests(model.config.vocab_size))
    engine = make_engine(model_dir, hierarchy, EngineConfig(max_batch_size=4), split=SPLIT)
    results = run_checked(engine, make_requests(model.config.vocab_size))
    assert [results[r.request_id].token_ids for r in expected] == [r.token_ids for r in expected]
    assert engine.scheduler.aheads_kept + engine.scheduler.aheads_dropped > 0


def test_abort_between_windows_frees_the_slot(model, model_dir, prompts, reference):
    hierarchy = Hierarchy(6, (1, 3), (2, 4))
    engine = make_engine(model_dir, hierarchy, EngineConfig(max_batch_size=2), split=SPLIT)
    keep, drop = requests_for(prompts[3:5], NEW_TOKENS)
    engine.add_request(keep)
    engine.add_request(drop)
    for _ in range(4):  # into the windows
        engine.step()
    assert engine.scheduler.aheads_kept + engine.scheduler.aheads_dropped > 0
    engine.abort(drop.request_id)
    results = {}
    while engine.has_unfinished():
        results |= {o.request_id: o.result for o in engine.step() if o.finished}
        engine.check_lengths()  # the aborted slot holds nothing, the other is consistent
    assert results[keep.request_id].token_ids == reference[3]


def test_statistics_count_what_the_first_stage_ran(model, model_dir, prompts):
    """Drafts and the verifier's checks made on the first stage appear in the request's statistics
    and the forward log (the cost model prices them)."""
    hierarchy = Hierarchy(6, (1, 3), (2, 4))
    engine = make_engine(model_dir, hierarchy, split=SPLIT)
    (result,) = engine.generate(requests_for(prompts[4:], NEW_TOKENS))
    stats = result.stats
    assert stats.levels[0].proposed > 0 and stats.levels[1].proposed >= stats.levels[1].accepted > 0
    assert stats.levels[2].proposed > 0 and stats.target_passes > 0
    logged = sum(n for shape, n in engine.forward_log.items() if not shape.prefill)
    assert logged > stats.target_passes * 2  # the first stage's own forwards are in the log
