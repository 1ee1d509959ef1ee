"""Chunked prefill through the real model: prompts longer than `prefill_chunk_tokens` enter over
several steps beside the running batch, and nothing about the output changes (greedy equals plain
greedy decoding; seeded sampling equals the unchunked engine's), whatever runs the stages."""

from __future__ import annotations

import pytest

from hispec.engine.scheduler import attention_break_even

from hispec.engine import EngineConfig, SpecEngine
from hispec.engine.plan import StepPlan, StepResult
from hispec.model.greedy import greedy_generate
from hispec.speculation import Hierarchy, Request, SamplingParams
from tests.unit.spec_helpers import make_engine, random_prompts, run_with_arrivals

CHUNK = 7
METHODS = {"ar": Hierarchy(6), "layerskip": Hierarchy(6, (2,), (3,)), "hispec": Hierarchy(6, (1, 3), (2, 4))}
# long prompts (over the chunk) mixed with short ones, joining a batch of 3 as others finish
LENGTHS = (40, 3, 100, 1, 65, 30, 7, 12)
MAX_NEW = (20, 30, 9, 25, 14, 6, 18, 11)


class PlanLog:
    """The engine's executor, keeping every plan it ran (which prompt tokens each step carried)."""

    def __init__(self, executor) -> None:
        self.inner, self.plans = executor, []
        self.model_config, self.num_slots, self.capacity = executor.model_config, executor.num_slots, executor.capacity
        self.kv_layout = executor.kv_layout

    def execute(self, plan: StepPlan) -> StepResult:
        self.plans.append(plan)
        return self.inner.execute(plan)

    def snapshot(self, with_tensors: bool = False):
        return self.inner.snapshot(with_tensors)

    def close(self) -> None:
        self.inner.close()

    def prompt_tokens(self) -> list[int]:
        """Prompt tokens of each plan with forwards."""
        return [sum(f.count for fwd in p.forwards if fwd.prefill for f in fwd.feeds) for p in self.plans if p.forwards]


def logged_engine(model_dir, hierarchy, config, split=None) -> tuple[SpecEngine, PlanLog]:
    built = make_engine(model_dir, hierarchy, config, split)
    log = PlanLog(built.executor)
    return SpecEngine(log, hierarchy, config), log


def requests(prompts, sampled: bool = False) -> list[Request]:
    sampling = [SamplingParams(temperature=0.9, top_k=30, seed=i) if sampled and i % 2 == 0 else SamplingParams()
                for i in range(len(prompts))]
    return [Request(p, n, s, stop_token_ids=(), request_id=f"r{i}") for i, (p, n, s) in
            enumerate(zip(prompts, MAX_NEW, sampling))]


@pytest.fixture(scope="module")
def prompts(model):
    return random_prompts(LENGTHS, model.config.vocab_size, seed=5)


@pytest.fixture(scope="module")
def reference(model, prompts):
    return {f"r{i}": greedy_generate(model, p, n)[0] for i, (p, n) in enumerate(zip(prompts, MAX_NEW))}


@pytest.mark.parametrize("split", [None, (0, 2, 6)], ids=["one-stage", "two-stages"])
@pytest.mark.parametrize("method", METHODS)
def test_chunked_prefill_equals_greedy(model_dir, prompts, reference, method, split):
    """Chunks of 7 prompt tokens a step: outputs equal plain greedy decoding, every stage's KV
    lengths match the scheduler's after every step, and running sequences step on while long
    prompts enter."""
    engine, log = logged_engine(model_dir, METHODS[method], EngineConfig(max_batch_size=3, prefill_chunk_tokens=CHUNK),
                                split)
    interleaved = []

    def on_step(engine: SpecEngine) -> None:
        engine.check_lengths()
        plan = log.plans[-1]
        prefill = any(fwd.prefill for fwd in plan.forwards)
        interleaved.append(prefill and any(not fwd.prefill for fwd in plan.forwards))

    results = run_with_arrivals(engine, requests(prompts), every=2, on_step=on_step)
    assert {rid: r.token_ids for rid, r in results.items()} == reference
    assert max(log.prompt_tokens()) == CHUNK and sum(log.prompt_tokens()) == sum(LENGTHS)
    assert sum(interleaved) >= 10  # prompt chunks ran in the same steps as decoding forwards


def test_chunked_prefill_keeps_seeded_sampling(model_dir, prompts, reference):
    """Sampling draws are keyed by seed, level and position: chunking the prompts changes no token
    (the long prompts are the sampled ones: r0, r2, r4, r6)."""
    hierarchy = METHODS["hispec"]
    outputs = []
    for chunk in (CHUNK, 256):
        engine = make_engine(model_dir, hierarchy, EngineConfig(max_batch_size=3, prefill_chunk_tokens=chunk))
        results = run_with_arrivals(engine, requests(prompts, sampled=True), every=2)
        outputs.append({rid: r.token_ids for rid, r in results.items()})
    assert outputs[0] == outputs[1]
    assert [len(outputs[0][f"r{i}"]) for i in range(len(MAX_NEW))] == list(MAX_NEW)
    assert all(outputs[0][f"r{i}"] != reference[f"r{i}"] for i in (0, 2, 4))  # sampled, not greedy


@pytest.mark.parametrize("split", [None, (0, 2, 6)], ids=["one-stage", "two-stages"])
def test_abort_mid_prefill_frees_slot_and_kv(model_dir, prompts, reference, split):
    engine, log = logged_engine(model_dir, METHODS["hispec"], EngineConfig(max_batch_size=2, prefill_chunk_tokens=CHUNK),
                                split)
    engine.add_request(requests(prompts)[1])  # 3 tokens: decoding from the next step on
    engine.step()
    engine.add_request(requests(prompts)[2])  # 100 tokens: 15 steps of chunks
    for _ in range(4):
        engine.step()
        engine.check_lengths()
    assert engine.num_prefilling == 1
    held = {slot: lengths for snap in engine.snapshot() for slot, lengths in snap.lengths.items()}
    # the long prompt's first chunks, in every layer: CHUNK tokens, then fewer as attention to the
    # prompt so far makes each token dearer (Scheduler._chunk_tokens)
    done, K = 0, attention_break_even(engine.model_config)
    for _ in range(4):
        done += int(CHUNK / (1 + done / K) + 1e-9)
    assert CHUNK * 3 < done < 4 * CHUNK
    assert set(held[1]) == {done}
    result = engine.abort("r2")
    assert (result.finish_reason, result.token_ids) == ("abort", [])
    assert engine.num_prefilling == 0 and 1 in engine.free_slots
    engine.check_lengths()  # its KV released: the slot holds nothing on any stage
    results = run_with_arrivals(engine, [])
    assert results["r1"].token_ids == reference["r1"]
