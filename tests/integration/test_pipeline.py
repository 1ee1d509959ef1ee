"""The engine through a Ray pipeline of stage actors (on CPU) decodes what the single-process
engine decodes, and the stages hold exactly what they should.

One module-scoped Ray instance; pipelines are module-scoped too (a start costs seconds): the
bundled model through a 2-stage and a 3-stage pipeline (one at a time), a tiny random 6-layer
model through ONE 2-stage pipeline with exit heads on every stage (each test builds its own
`SpecEngine`s over that pipeline's executor, one after the other; an idle engine has released
its slots), and a tiny vocabulary-8 model for the chi-square test.

  1. greedy identity on the bundled model: 50 held-out prompts x 128 new tokens, `ar`, `layerskip`
     and `hispec` (the tuned hierarchies) through both pipelines equal the single-process engine
     and transformers' greedy `generate` (all 3 methods on all 50 prompts: the whole module runs
     in ~2.5-3 min on 2 shared cores, so nothing is cut to a subset);
  2. the K = 0..3 grid on the tiny model equals plain greedy decoding, with EOS inside drafts,
     max_new_tokens reached mid-window, one-token prompts, the context limit, an abort mid-way,
     requests joining and leaving a running batch;
  3. seeded sampling equals the single-process engine's; the K = 2 chi-square test passes;
  4. after every step every stage's KV (and the rings of unverified hidden states) equals a fresh
     forward over the tokens the stage holds;
  5. each stage loaded only its own tensors and runs on one torch thread.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict

import pytest

from hispec.errors import InvalidRequest
import torch

from hispec.config import EngineConfig, ModelConfig
from hispec.engine import SpecEngine
from hispec.model import load_model
from hispec.model.greedy import greedy_generate
from hispec.models import DEFAULT_MODEL
from hispec.pipeline import Pipeline, PipelineExecutor, PipelineSpec
from hispec.pipeline.build import PipelinedEngine
from hispec.speculation import BatchPolicy, Hierarchy, Request, SamplingParams, resolve_hierarchy
from tests.unit.spec_helpers import GRID, first_draft_proposal, fresh_forward, random_prompts, requests_for, tiny_model
from tests.unit.test_spec_sampling import ALPHA, CASES, NEW, PROMPT, SAMPLES, VOCAB, chi_square_pvalue, exact_joint

pytestmark = pytest.mark.slow

CPUS_PER_STAGE = 0.25  # logical: every pipeline of this module fits the 2-CPU Ray instance at once


def hierarchy_id(exits, budgets) -> str:
    return f"e{','.join(map(str, exits))}-n{','.join(map(str, budgets))}" if exits else "ar"


def over_hierarchies(cases):
    """Parametrize a test over (exits, budgets) pairs of the 6-layer model."""
    return pytest.mark.parametrize("exits,budgets", cases, ids=[hierarchy_id(*c) for c in cases])


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def one_driver_thread():
    """This process (scheduler, references) runs on one torch thread, like each stage actor: they
    all share the 2 cores, and a 2-thread OpenMP region in an oversubscribed process runs many
    times slower than a 1-thread one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def start_pipeline(spec: PipelineSpec) -> tuple[Pipeline, PipelineExecutor]:
    pipeline = Pipeline.create(spec)
    try:
        return pipeline, PipelineExecutor(pipeline.connection)
    except BaseException:
        pipeline.shutdown()
        raise


def finish(engine: SpecEngine) -> None:
    """Leave the shared executor clean for the next engine: end what is left, release its slots,
    and check that every stage agrees with the scheduler (no slot holds anything)."""
    if engine.has_unfinished():
        engine.scheduler.abort_all()
    engine.check_lengths()
    assert all(length == 0 for snap in engine.snapshot() for lengths in snap.lengths.values() for length in lengths)


def check_stage_tensors(described: list[dict], bounds: tuple[int, ...], exits: tuple[int, ...], tied: bool) -> None:
    """Stage s loaded the tensors of layers [bounds[s], bounds[s + 1]) and nothing else but the
    embeddings (stage 0; a tied head) and the final norm (stages with an exit head)."""
    assert [d["stage"] for d in described] == list(range(len(bounds) - 1))
    assert len({d["pid"] for d in described} | {os.getpid()}) == len(described) + 1  # a process each
    for s, d in enumerate(described):
        lo, hi = bounds[s], bounds[s + 1]
        assert tuple(d["layers"]) == (lo, hi) and d["threads"] == 1, d
        names = set(d["tensors"])
        layers = {int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))}
        assert layers == set(range(lo, hi)), (s, sorted(layers))
        assert all(len([n for n in names if n.startswith(f"model.layers.{i}.")]) == 9 for i in range(lo, hi))
        head = s == len(bounds) - 2 or any(lo < e <= hi for e in exits)
        others = names - {n for n in names if n.startswith("model.layers.")}
        expected = set()
        if lo == 0 or (head and tied):
            expected.add("model.embed_tokens.weight")
        if head:
            expected.add("model.norm.weight")
            if not tied:
                expected.add("lm_head.weight")
        assert others == expected, (s, sorted(others))


# ==== 1. the bundled model: greedy identity through 2 and 3 stages ===============================
NUM_PROMPTS, NEW_TOKENS, BATCH = 50, 128, 16
METHODS = ("ar", "layerskip", "hispec")
BUNDLED_CONFIG = ModelConfig.from_pretrained(DEFAULT_MODEL)
L = BUNDLED_CONFIG.num_layers
HIERARCHIES = {m: resolve_hierarchy(m, L, DEFAULT_MODEL) for m in METHODS}
BUNDLED_EXITS = tuple(sorted({e for h in HIERARCHIES.values() for e in h.exits}))
E_V = max(BUNDLED_EXITS)  # the deepest exit below the target: where stage 0 ends


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def bundled_prompts(tokenizer) -> list[list[int]]:
    from hispec.bench.prompts import bundled_heldout_prompts

    prompts = bundled_heldout_prompts()[:NUM_PROMPTS]
    assert len(prompts) == NUM_PROMPTS
    return [tokenizer(p)["input_ids"] for p in prompts]


@pytest.fixture(scope="module")
def bundled_model():
    return load_model(DEFAULT_MODEL, dtype=torch.float32)


@pytest.fixture(scope="module")
def single_process(bundled_model, bundled_prompts):
    """The single-process engine's (tokens, finish reason) per method, computed once."""
    cache: dict[str, list] = {}

    def results(method: str) -> list[tuple[list[int], str]]:
        if method not in cache:
            engine = SpecEngine(bundled_model, HIERARCHIES[method], EngineConfig(max_batch_size=BATCH))
            cache[method] = [(r.token_ids, r.finish_reason)
                             for r in engine.generate(Request(p, NEW_TOKENS) for p in bundled_prompts)]
        return cache[method]

    return results


class TransformersReference:
    """transformers' greedy `generate` (fp32): batches of 10 prompts of similar length, left-padded.
    Padding can move a logit by an ulp; a prompt whose batched output differs from ours is rerun
    alone (`alone`), which is the reference proper."""

    def __init__(self, prompts: list[list[int]], eos: tuple[int, ...], pad: int) -> None:
        from transformers import AutoModelForCausalLM

        self.prompts, self.eos, self.pad = prompts, list(eos), pad
        self.model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
        self.tokens: list[list[int] | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for chunk in (order[i : i + 10] for i in range(0, len(order), 10)):
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in chunk])
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk])
            for i, row in zip(chunk, self._generate(ids, mask)):
                self.tokens[i] = row
        self.rerun: set[int] = set()

    @torch.no_grad()
    def _generate(self, ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        out = self.model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                  eos_token_id=self.eos, pad_token_id=self.pad)
        rows = []
        for row in out[:, ids.shape[1] :].tolist():
            stops = [t for t, token in enumerate(row) if token in self.eos]
            rows.append(row[: stops[0] + 1] if stops else row)
        return rows

    def alone(self, i: int) -> list[int]:
        if i not in self.rerun:
            self.rerun.add(i)
            ids = torch.tensor([self.prompts[i]])
            self.tokens[i] = self._generate(ids, torch.ones_like(ids))[0]
        return self.tokens[i]

    def check(self, tokens: list[list[int]]) -> None:
        for i, ours in enumerate(tokens):
            reference = self.tokens[i] if ours == self.tokens[i] else self.alone(i)
            assert ours == reference, f"prompt {i}: transformers' greedy generate differs"


@pytest.fixture(scope="module")
def transformers_reference(bundled_prompts) -> TransformersReference:
    return TransformersReference(bundled_prompts, BUNDLED_CONFIG.eos_token_ids, 2)


@pytest.fixture(scope="module", params=[2, 3], ids=["2-stage", "3-stage"])
def bundled_pipeline(request, ray_cluster):
    """2 stages cut explicitly at e_v; 3 stages cut by PipelinedEngine (measured layer costs)."""
    policy, config = BatchPolicy.fixed(HIERARCHIES["hispec"]), EngineConfig(max_batch_size=BATCH)
    if request.param == 2:
        spec = PipelineSpec(DEFAULT_MODEL, (0, E_V, L), BATCH, config.capacity(BUNDLED_CONFIG.max_position_embeddings),
                            exits=BUNDLED_EXITS, cpus_per_stage=CPUS_PER_STAGE)
        pipelined = PipelinedEngine.start(DEFAULT_MODEL, policy, 2, config, spec=spec)
    else:
        pipelined = PipelinedEngine.start(DEFAULT_MODEL, policy, 3, config, cpus_per_stage=CPUS_PER_STAGE)
    try:
        yield pipelined
    finally:
        pipelined.close()


@pytest.mark.parametrize("method", METHODS)
def test_bundled_greedy_equals_single_process_and_transformers(bundled_pipeline, single_process,
                                                               transformers_reference, bundled_prompts, method):
    engine = SpecEngine(bundled_pipeline.executor, HIERARCHIES[method], EngineConfig(max_batch_size=BATCH))
    try:
        results = engine.generate(Request(p, NEW_TOKENS) for p in bundled_prompts)
    finally:
        finish(engine)
    assert [(r.token_ids, r.finish_reason) for r in results] == single_process(method)
    transformers_reference.check([r.token_ids for r in results])
    if method != "ar":
        stats = engine.total_stats
        assert stats.new_tokens / stats.target_passes > 1.5  # speculation actually happened


SAMPLED = SamplingParams(temperature=0.8, top_p=0.9)


def bundled_sampled_requests(prompts: list[list[int]]) -> list[Request]:
    """HiSpec with temperature 0.8 / top-p 0.9: 5 prompts x 2 seeds, batched with 2 greedy requests."""
    return ([Request(p, 40, SamplingParams(SAMPLED.temperature, top_p=SAMPLED.top_p, seed=seed))
             for seed in (0, 12345) for p in prompts[:5]] + [Request(p, 40) for p in prompts[5:7]])


@pytest.fixture(scope="module")
def bundled_sampled_reference(bundled_model, bundled_prompts):
    engine = SpecEngine(bundled_model, HIERARCHIES["hispec"], EngineConfig(max_batch_size=BATCH))
    return [(r.token_ids, r.finish_reason) for r in engine.generate(bundled_sampled_requests(bundled_prompts))]


def test_bundled_seeded_sampling_equals_single_process(bundled_pipeline, bundled_sampled_reference, bundled_prompts):
    engine = SpecEngine(bundled_pipeline.executor, HIERARCHIES["hispec"], EngineConfig(max_batch_size=BATCH))
    try:
        results = engine.generate(bundled_sampled_requests(bundled_prompts))
    finally:
        finish(engine)
    assert [(r.token_ids, r.finish_reason) for r in results] == bundled_sampled_reference
    assert [r.token_ids for r in results[:5]] != [r.token_ids for r in results[5:10]]  # the seeds matter: it sampled


def test_bundled_stages_load_only_their_tensors(bundled_pipeline):
    spec = bundled_pipeline.pipeline.spec
    bounds = spec.bounds
    assert bounds[:2] == (0, E_V) and len(bounds) in (3, 4) and bounds[-1] == L
    assert spec.exits == BUNDLED_EXITS
    described = bundled_pipeline.pipeline.describe()
    check_stage_tensors(described, bounds, BUNDLED_EXITS, BUNDLED_CONFIG.tie_word_embeddings)
    stage0 = {n for n in described[0]["tensors"] if n.startswith("model.layers.")}
    stage1 = {n for n in described[1]["tensors"] if n.startswith("model.layers.")}
    assert not any(int(n.split(".")[2]) >= E_V for n in stage0)
    assert not any(int(n.split(".")[2]) < E_V for n in stage1)


# ==== 2. the tiny model: the K = 0..3 grid and the edge cases through 2 stages ==================
TINY_BOUNDS, TINY_EXITS, TINY_SLOTS, TINY_CAPACITY = (0, 3, 6), (1, 2, 3, 4, 5), 4, 256
PROMPT_LENGTHS, TINY_NEW = (1, 2, 5, 11, 17), 33


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny6")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return tiny_model(tiny_dir)


@pytest.fixture(scope="module")
def tiny_pipeline(tiny, tiny_dir, ray_cluster):
    """ONE pipeline for every hierarchy: heads on both stages (exits 1..5)."""
    spec = PipelineSpec(tiny_dir, TINY_BOUNDS, TINY_SLOTS, TINY_CAPACITY, exits=TINY_EXITS, cpus_per_stage=CPUS_PER_STAGE)
    pipeline, executor = start_pipeline(spec)
    try:
        yield pipeline, executor
    finally:
        executor.close()
        pipeline.shutdown()


@pytest.fixture(scope="module")
def tiny_executor(tiny_pipeline) -> PipelineExecutor:
    return tiny_pipeline[1]


@pytest.fixture(scope="module")
def tiny_prompts(tiny):
    return random_prompts(PROMPT_LENGTHS, tiny.config.vocab_size)


@pytest.fixture(scope="module")
def tiny_reference(tiny, tiny_prompts):
    return [greedy_generate(tiny, p, TINY_NEW)[0] for p in tiny_prompts]


def tiny_engine(executor, exits, budgets, **config) -> SpecEngine:
    return SpecEngine(executor, Hierarchy(6, exits, budgets), EngineConfig(**config))


def generate(engine: SpecEngine, requests) -> list:
    try:
        return engine.generate(requests)
    finally:
        finish(engine)


@over_hierarchies(GRID)
def test_grid_equals_greedy(tiny_executor, tiny_prompts, tiny_reference, exits, budgets):
    # 5 prompts (one of a single token) through 3 slots: sequences join as others finish
    engine = tiny_engine(tiny_executor, exits, budgets, max_batch_size=3)
    results = generate(engine, requests_for(tiny_prompts, TINY_NEW))
    assert [r.token_ids for r in results] == tiny_reference
    assert all(r.finish_reason == "length" for r in results)


def greedy_with_eos(reference: list[int], eos: int) -> tuple[list[int], str]:
    """Plain greedy decoding stopped at `eos`: the reference cut after its first `eos`."""
    return (reference[: reference.index(eos) + 1], "stop") if eos in reference else (reference, "length")


@over_hierarchies([g for g in GRID if g[0]])
def test_eos_inside_drafts(tiny, tiny_executor, tiny_prompts, tiny_reference, exits, budgets):
    """EOS as the token the draft proposes first (accepted or rejected) and as one the target
    emits mid-way; all 15 (prompt, EOS) pairs as one batch of requests."""
    requests, expected = [], []
    for prompt, ref in zip(tiny_prompts, tiny_reference):
        drafted = first_draft_proposal(tiny, prompt + ref[:1], exits[0])
        for eos in sorted({drafted, ref[3], ref[10]}):
            requests += requests_for([prompt], TINY_NEW, stop_token_ids=(eos,))
            expected.append(greedy_with_eos(ref, eos))
    assert any(reason == "stop" for _, reason in expected)
    results = generate(tiny_engine(tiny_executor, exits, budgets, max_batch_size=TINY_SLOTS), requests)
    assert [(r.token_ids, r.finish_reason) for r in results] == expected


@over_hierarchies([((2,), (6,)), ((1, 3), (3, 5)), ((1, 2, 4), (2, 3, 4))])
def test_max_new_tokens_mid_window(tiny_executor, tiny_prompts, tiny_reference, exits, budgets):
    counts = (1, 2, 3, 5, 8, 13)
    requests = [r for n in counts for r in requests_for(tiny_prompts, n)]
    results = generate(tiny_engine(tiny_executor, exits, budgets, max_batch_size=TINY_SLOTS), requests)
    assert [r.token_ids for r in results] == [ref[:n] for n in counts for ref in tiny_reference]
    assert [r.stats.new_tokens for r in results] == [n for n in counts for _ in tiny_reference]
    assert all(r.finish_reason == "length" for r in results)


def test_context_limit(tiny_executor, tmp_path):
    """max_context=24 over a 256-token pipeline: the engine stops where a 24-position model must."""
    short = tiny_model(tmp_path, max_position_embeddings=24)  # the same weights (same seed)
    prompts = random_prompts((1, 5, 20, 23), short.config.vocab_size, seed=3)
    expected = [greedy_generate(short, p, 24 - len(p)) for p in prompts]
    for exits, budgets in GRID:
        engine = tiny_engine(tiny_executor, exits, budgets, max_batch_size=TINY_SLOTS, max_context=24)
        results = generate(engine, [Request(p, 24 - len(p), stop_token_ids=()) for p in prompts])
        assert [(r.token_ids, r.finish_reason) for r in results] == expected, (exits, budgets)
    with pytest.raises(InvalidRequest, match="leaves no room"):
        engine.add_request(Request(list(range(24)), 5))
    with pytest.raises(InvalidRequest, match="max_new_tokens"):
        engine.add_request(Request(prompts[0], 40))


def test_abort_mid_generation(tiny_executor, tiny_prompts, tiny_reference):
    """Abort a running and a waiting request mid-way: their slots free at once, the others finish
    unchanged, and a request admitted into the freed slot decodes correctly."""
    engine = tiny_engine(tiny_executor, (1, 3), (2, 4), max_batch_size=3)
    try:
        ids = [engine.add_request(r) for r in requests_for(tiny_prompts, TINY_NEW)]
        streamed = defaultdict(list)
        results = {}

        def step():
            for out in engine.step():
                streamed[out.request_id] += out.new_token_ids
                if out.result is not None:
                    results[out.request_id] = out.result
            engine.check_lengths()

        while len(streamed[ids[1]]) < 5:
            step()
        assert engine.num_running == 3 and engine.num_waiting == 2
        slot = engine.scheduler.running[ids[1]].slot
        running = engine.abort(ids[1])
        waiting = engine.abort(ids[4])
        assert running.finish_reason == waiting.finish_reason == "abort"
        assert running.token_ids == streamed[ids[1]] == tiny_reference[1][: len(running.token_ids)]
        assert waiting.token_ids == [] and engine.abort(ids[1]) is None
        engine.check_lengths()
        assert all(snap.lengths[slot] == [0] * 3 for snap in engine.snapshot())  # released on every stage
        late = engine.add_request(requests_for(tiny_prompts[4:], TINY_NEW)[0])
        while engine.has_unfinished():
            step()
    finally:
        finish(engine)
    for i in (0, 2, 3):
        assert results[ids[i]].token_ids == streamed[ids[i]] == tiny_reference[i]
    assert results[late].token_ids == tiny_reference[4]
    assert ids[1] not in results and ids[4] not in results


@over_hierarchies([((), ()), ((2, 4), (1, 1)), ((1, 3, 5), (2, 2, 2))])
def test_requests_join_and_leave_a_running_batch(tiny_executor, tiny_prompts, tiny_reference, exits, budgets):
    """Requests added while the batch steps (one every other step), leaving at different lengths."""
    engine = tiny_engine(tiny_executor, exits, budgets, max_batch_size=TINY_SLOTS)
    lengths = (TINY_NEW, 7, 20, 3, 15, TINY_NEW, 1, 9, 26)
    pending = [(i % 5, n) for i, n in enumerate(lengths)]
    submitted, results, streamed = {}, {}, defaultdict(list)
    joined_running = 0
    try:
        steps = 0
        while pending or engine.has_unfinished():
            if pending and steps % 2 == 0:
                joined_running += engine.num_running > 0
                p, n = pending.pop(0)
                submitted[engine.add_request(requests_for([tiny_prompts[p]], n)[0])] = (p, n)
            for out in engine.step():
                streamed[out.request_id] += out.new_token_ids
                if out.result is not None:
                    results[out.request_id] = out.result
            engine.check_lengths()
            steps += 1
    finally:
        finish(engine)
    assert joined_running >= 5  # most requests joined a batch already decoding
    assert results.keys() == submitted.keys()
    for request_id, (p, n) in submitted.items():
        assert results[request_id].token_ids == streamed[request_id] == tiny_reference[p][:n]
        assert results[request_id].finish_reason == "length"


def test_chunked_prefill_through_the_pipeline(tiny, tiny_executor):
    """Prompts of 30-45 tokens entering 5 tokens a step (later chunks start mid-sequence on both
    stages) beside a running batch, greedy and seeded-sampled: greedy equals plain greedy decoding,
    sampled equals the unchunked single-process engine, stage KV lengths match after every step."""
    layout = tiny_executor.kv_layout  # the pipeline planned its caches from the (default) budget
    assert (layout.num_slots, layout.capacity) == (TINY_SLOTS, TINY_CAPACITY) and layout.total_bytes > 0
    prompts = random_prompts((30, 2, 45, 4), tiny.config.vocab_size, seed=9)
    sampled = SamplingParams(temperature=0.9, top_k=30, seed=3)
    requests = lambda: [Request(p, 10, sampled if i == 2 else SamplingParams(), stop_token_ids=(), request_id=f"c{i}")  # noqa: E731
                        for i, p in enumerate(prompts)]
    unchunked = SpecEngine(tiny, Hierarchy(6, (1, 3), (2, 4)), EngineConfig(max_batch_size=TINY_SLOTS)).generate(requests())
    engine = tiny_engine(tiny_executor, (1, 3), (2, 4), max_batch_size=TINY_SLOTS, prefill_chunk_tokens=5)
    results, pending, steps = {}, requests(), 0
    try:
        while pending or engine.has_unfinished():
            if pending and steps % 3 == 0:
                engine.add_request(pending.pop(0))
            results |= {out.request_id: out.result for out in engine.step() if out.result is not None}
            engine.check_lengths()
            steps += 1
    finally:
        finish(engine)
    assert [results[f"c{i}"].token_ids for i in range(4)] == [r.token_ids for r in unchunked]
    for i in (0, 1, 3):
        assert results[f"c{i}"].token_ids == greedy_generate(tiny, prompts[i], 10)[0]
    assert steps >= 45 // 5  # the 45-token prompt alone took 9 steps to enter


# ==== 3. sampling ==================================================================================
@over_hierarchies([((), ()), ((2,), (3,)), ((1, 3), (2, 4)), ((1, 2, 4), (1, 2, 3))])
def test_seeded_sampling_equals_single_process(tiny, tiny_executor, tiny_prompts, exits, budgets):
    requests = lambda: ([Request(p, 24, SamplingParams(SAMPLED.temperature, top_p=SAMPLED.top_p, seed=seed),  # noqa: E731
                                 stop_token_ids=()) for seed in (0, 7, 2**40) for p in tiny_prompts]
                        + requests_for(tiny_prompts[:2], 24))
    config = dict(max_batch_size=TINY_SLOTS)
    expected = SpecEngine(tiny, Hierarchy(6, exits, budgets), EngineConfig(**config)).generate(requests())
    results = generate(tiny_engine(tiny_executor, exits, budgets, **config), requests())
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]
    n = len(tiny_prompts)
    assert results[:n] != results[n : 2 * n]  # different seeds, different samples


@pytest.fixture(scope="module")
def vocab8(tmp_path_factory):
    directory = tmp_path_factory.mktemp("v8")
    # as in tests/unit/test_spec_sampling.py: exit distributions differ from the final one
    return directory, tiny_model(directory, num_layers=4, vocab_size=VOCAB, initializer_range=0.2)


@pytest.fixture(scope="module")
def vocab8_executor(vocab8, ray_cluster):
    directory, _ = vocab8
    spec = PipelineSpec(directory, (0, 2, 4), 64, 16, exits=(1, 2, 3), cpus_per_stage=CPUS_PER_STAGE)
    pipeline, executor = start_pipeline(spec)
    try:
        yield executor
    finally:
        executor.close()
        pipeline.shutdown()


@pytest.mark.parametrize("case", ["K2", "K2-topk-topp"])
def test_sampling_chi_square_through_pipeline(vocab8, vocab8_executor, case):
    """The chi-square test of tests/unit/test_spec_sampling.py, with the stages in Ray actors."""
    _, model = vocab8
    exits, budgets, params = CASES[case]
    engine = SpecEngine(vocab8_executor, Hierarchy(4, exits, budgets), EngineConfig(max_batch_size=64))
    requests = [Request(PROMPT, NEW, SamplingParams(params.temperature, params.top_k, params.top_p, seed),
                        stop_token_ids=()) for seed in range(SAMPLES)]
    samples = torch.tensor([r.token_ids for r in generate(engine, requests)])  # [N, 4]
    joint = exact_joint(model, params)
    counts = torch.zeros((VOCAB,) * NEW)
    counts.index_put_(tuple(samples.T), torch.ones(SAMPLES), accumulate=True)
    result = {
        "t2": chi_square_pvalue(counts.sum((0, 2, 3)), joint.sum((0, 2, 3))),
        "t3": chi_square_pvalue(counts.sum((0, 1, 3)), joint.sum((0, 1, 3))),
        "t4": chi_square_pvalue(counts.sum((0, 1, 2)), joint.sum((0, 1, 2))),
        "t2,t3": chi_square_pvalue(counts.sum((0, 3)), joint.sum((0, 3))),
    }
    assert min(result.values()) > ALPHA, result


# ==== 4. KV consistency ==========================================================================
@over_hierarchies([((2,), (3,)), ((4,), (2,)), ((1, 3), (2, 4)), ((1, 2, 4), (1, 2, 3))])
def test_stage_kv_matches_fresh_forward_after_every_step(tiny, tiny_executor, exits, budgets):
    """Level k's layers hold seq.fed[k] tokens on whichever stage they live; the ring at each
    exit below the target holds the hidden states of the tokens the level above has not run."""
    hierarchy = Hierarchy(6, exits, budgets)
    engine = SpecEngine(tiny_executor, hierarchy, EngineConfig(max_batch_size=TINY_SLOTS))
    prompts = random_prompts((1, 6, 3, 10, 4), tiny.config.vocab_size, seed=5)
    samplings = [SamplingParams(), SamplingParams(temperature=1.0, seed=1),
                 SamplingParams(temperature=0.7, top_p=0.9, seed=2), SamplingParams(), SamplingParams()]
    W = hierarchy.window
    rejections, kv_checks, ring_checks = 0, 0, 0
    try:
        for p, s in zip(prompts, samplings):  # 5 requests, 4 slots: one joins later
            engine.add_request(Request(p, 24, s, stop_token_ids=()))
        while engine.has_unfinished():
            engine.step()
            engine.check_lengths()
            snapshots = engine.snapshot(with_tensors=True)
            assert [snap.layer_range for snap in snapshots] == [(0, 3), (3, 6)]
            for seq in engine.scheduler.running.values():
                rejections += seq.stats.levels[-1].proposed - seq.stats.levels[-1].accepted
                cache, hidden = fresh_forward(tiny, seq.tokens)
                for level in range(hierarchy.depth + 1):
                    lo, hi = hierarchy.layer_range(level)
                    for layer in range(lo, hi):
                        snap = next(s for s in snapshots if s.layer_range[0] <= layer < s.layer_range[1])
                        row = layer - snap.layer_range[0]
                        n = seq.fed[level]
                        assert snap.lengths[seq.slot][row] == n
                        k_ref, v_ref = (t[:, :n] for t in cache.slot_tensors(layer, 0))
                        torch.testing.assert_close(snap.keys[seq.slot][row], k_ref, atol=1e-5, rtol=1e-4)
                        torch.testing.assert_close(snap.values[seq.slot][row], v_ref, atol=1e-5, rtol=1e-4)
                        kv_checks += 1
                    if level < hierarchy.depth and seq.fed[level + 1] < seq.fed[level]:  # unverified states at its exit
                        snap = next(s for s in snapshots if s.layer_range[0] < hi <= s.layer_range[1])
                        ring = snap.rings[next(key for key in snap.rings if key.exit == hi and key.window == W)]
                        for pos in range(seq.fed[level + 1], seq.fed[level]):
                            torch.testing.assert_close(ring[seq.slot, pos % W], hidden[hi - 1][pos], atol=1e-5, rtol=1e-4)
                            ring_checks += 1
    finally:
        finish(engine)
    assert rejections > 0 and kv_checks > 0 and ring_checks > 0  # rollbacks and buffered states were exercised


# ==== 5. the stage split =========================================================================
def test_tiny_stages_load_only_their_tensors(tiny_pipeline):
    pipeline, _ = tiny_pipeline
    check_stage_tensors(pipeline.describe(), TINY_BOUNDS, TINY_EXITS, tied=True)
