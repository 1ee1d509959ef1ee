"""Greedy speculation at every depth K = 0..3 equals plain greedy decoding of the full model."""

from __future__ import annotations

import pytest

from hispec.model.greedy import greedy_generate
from hispec.engine import EngineConfig, SpecEngine
from hispec.errors import InvalidRequest
from hispec.speculation import Hierarchy, Request
from tests.unit.spec_helpers import GRID, first_draft_proposal, random_prompts, requests_for, run_engine, tiny_model

PROMPT_LENGTHS = (1, 2, 5, 11, 17)
NEW_TOKENS = 33


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny6"))


@pytest.fixture(scope="module")
def prompts(model):
    return random_prompts(PROMPT_LENGTHS, model.config.vocab_size)


@pytest.fixture(scope="module")
def reference(model, prompts):
    return [greedy_generate(model, p, NEW_TOKENS)[0] for p in prompts]


@pytest.mark.parametrize("exits,budgets", GRID, ids=[f"e{e}-n{n}" for e, n in GRID])
def test_equals_greedy(model, prompts, reference, exits, budgets):
    # 5 prompts through 3 slots: sequences join as others finish
    results = run_engine(model, exits, budgets, requests_for(prompts, NEW_TOKENS), max_batch_size=3)
    assert [r.token_ids for r in results] == reference
    assert all(r.finish_reason == "length" for r in results)


@pytest.mark.parametrize("exits,budgets", GRID, ids=[f"e{e}-n{n}" for e, n in GRID])
@pytest.mark.parametrize("draft_vocab", [7, 40])
def test_pruned_draft_head_equals_greedy(model, prompts, reference, exits, budgets, draft_vocab):
    """Proposals from a head over tokens [0, draft_vocab) only (7: most true tokens are outside,
    so nearly every proposal is rejected; 40 of 101: some are) still give plain greedy's output
    (with 7, only a target on the full head can produce it), and the levels below used that head."""
    requests = requests_for(prompts, NEW_TOKENS)
    engine = SpecEngine(model, Hierarchy(model.config.num_layers, exits, budgets),
                        EngineConfig(max_batch_size=3, draft_vocab=draft_vocab))
    assert [r.token_ids for r in engine.generate(requests)] == reference
    scored = {shape.head_vocab for shape in engine.forward_log if shape.head_rows and not shape.prefill}
    assert scored == ({draft_vocab, 0} if exits else {0})


@pytest.mark.parametrize("exits,budgets", [((2,), (6,)), ((1, 3), (3, 5)), ((1, 2, 4), (2, 3, 4))])
@pytest.mark.parametrize("max_new", [1, 2, 3, 5, 8, 13])
def test_max_new_tokens_mid_buffer(model, prompts, reference, exits, budgets, max_new):
    results = run_engine(model, exits, budgets, requests_for(prompts, max_new))
    assert [r.token_ids for r in results] == [ref[:max_new] for ref in reference]
    assert all(r.finish_reason == "length" and r.stats.new_tokens == max_new for r in results)


@pytest.mark.parametrize("exits,budgets", [e for e in GRID if e[0]], ids=[f"e{e}-n{n}" for e, n in GRID if e])
def test_eos_inside_drafts(model, prompts, reference, exits, budgets):
    """EOS as a token the draft proposes first (rejected or accepted) and as one the target emits."""
    for prompt, ref in zip(prompts, reference):
        drafted = first_draft_proposal(model, prompt + ref[:1], exits[0])
        for eos in {drafted, ref[3], ref[10]}:
            expected, reason = greedy_generate(model, prompt, NEW_TOKENS, (eos,))
            (result,) = run_engine(model, exits, budgets, requests_for([prompt], NEW_TOKENS, stop_token_ids=(eos,)))
            assert (result.token_ids, result.finish_reason) == (expected, reason), f"eos={eos}"


def test_context_limit(tmp_path):
    """A 24-position model: prompt + new tokens up to 24 run to the end of the context; a request
    for more is refused at once, naming the field."""
    model = tiny_model(tmp_path, max_position_embeddings=24)
    prompts = random_prompts((1, 5, 20, 23), model.config.vocab_size, seed=3)
    expected = [greedy_generate(model, p, 24 - len(p)) for p in prompts]
    for exits, budgets in GRID:
        results = run_engine(model, exits, budgets, [Request(p, 24 - len(p), stop_token_ids=()) for p in prompts])
        assert [(r.token_ids, r.finish_reason) for r in results] == expected
    engine = SpecEngine(model, Hierarchy(6, (2,), (3,)))
    assert (engine.capacity, engine.executor.stages[0].cache.capacity) == (24, 23)  # the last token is never run
    with pytest.raises(InvalidRequest, match="leaves no room") as refused:
        engine.add_request(Request(list(range(24)), 5))
    assert refused.value.field == "prompt"
    with pytest.raises(InvalidRequest, match="at most 4") as refused:
        engine.add_request(Request(list(range(20)), 5))
    assert refused.value.field == "max_new_tokens"
    assert not engine.has_unfinished()


def test_model_eos_stops_by_default(tmp_path, model, prompts, reference):
    """Without explicit stop ids a request stops at the checkpoint's EOS ids."""
    eos = reference[2][5]  # same weights, but this token is the checkpoint's EOS
    with_eos = tiny_model(tmp_path, eos_token_id=eos)
    assert with_eos.config.eos_token_ids == (eos,)
    expected = [greedy_generate(with_eos, p, NEW_TOKENS, (eos,)) for p in prompts]
    assert any(reason == "stop" for _, reason in expected)
    results = run_engine(with_eos, (1, 3), (2, 4), [Request(p, NEW_TOKENS) for p in prompts])
    assert [(r.token_ids, r.finish_reason) for r in results] == expected


@pytest.mark.parametrize("exits,budgets", GRID, ids=[f"e{e}-n{n}" for e, n in GRID])
def test_stats_add_up(model, prompts, exits, budgets):
    (result,) = run_engine(model, exits, budgets, requests_for(prompts[3:4], NEW_TOKENS))
    stats, K = result.stats, len(exits)
    assert stats.new_tokens == NEW_TOKENS
    assert stats.target_passes == stats.levels[K].rounds + 1  # + the prefill
    if K == 0:
        assert stats.layer_forwards == stats.layer_token_passes == 6 * NEW_TOKENS
        return
    target = stats.levels[K]
    # every target pass commits its accepted tokens plus at most one recovered / bonus token
    assert target.accepted + 1 <= stats.new_tokens <= target.accepted + target.rounds + 1
    for level in stats.levels[1:]:
        assert 0 <= level.accepted <= level.proposed
    assert stats.levels[0].proposed >= stats.levels[1].proposed  # a level checks only what was drafted below
    report = stats.to_dict(Hierarchy(6, exits, budgets))
    assert report["tokens_per_target_pass"] == round(NEW_TOKENS / stats.target_passes, 4)
