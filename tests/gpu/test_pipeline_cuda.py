"""The pipeline on CUDA (skipped without 2 GPUs): one GPU per stage, hidden rows over NCCL.
Greedy output equals plain greedy decoding of the whole model; a stage's KV and lengths agree
with the scheduler after every step."""

from __future__ import annotations

import pytest
import torch

from hispec.engine import EngineConfig
from hispec.model import load_model
from hispec.model.greedy import greedy_generate
from hispec.speculation import BatchPolicy, Hierarchy, Request
from tests.unit.spec_helpers import GRID, random_prompts
from tests.unit.tiny_checkpoints import make_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]


@pytest.fixture(scope="module")
def ray_gpus():
    import ray

    ray.init(address="local", num_gpus=torch.cuda.device_count(), include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 so argmax ties do not flip
    directory = tmp_path_factory.mktemp("tiny6")
    make_checkpoint(directory, "tied-gqa", num_layers=6)
    return directory


def test_nccl_pipeline_equals_plain_greedy(ray_gpus, tiny):
    from hispec.pipeline import PipelineSpec
    from hispec.pipeline.build import PipelinedEngine

    model = load_model(tiny, device="cuda")
    prompts = random_prompts((1, 4, 9, 15), model.config.vocab_size)
    reference = [greedy_generate(model, p, 30)[0] for p in prompts]
    spec = PipelineSpec(tiny, (0, 3, 6), num_slots=3, capacity=128, exits=(1, 2, 3, 4, 5), device="cuda")
    assert spec.data_backend == "nccl"
    hierarchy = Hierarchy(6, *GRID[5])
    with PipelinedEngine.start(tiny, BatchPolicy.fixed(hierarchy), 2, EngineConfig(max_batch_size=3), spec=spec) as pp:
        assert {d["device"] for d in pp.pipeline.describe()} == {"cuda:0"}  # each actor sees its own GPU as 0
        for exits, budgets in GRID:
            from hispec.engine import SpecEngine

            engine = SpecEngine(pp.executor, Hierarchy(6, exits, budgets), EngineConfig(max_batch_size=3))
            for p in prompts:
                engine.add_request(Request(p, 30, stop_token_ids=()))
            results = {}
            while engine.has_unfinished():
                for out in engine.step():
                    if out.finished:
                        results[tuple(out.result.prompt_ids)] = out.result.token_ids
                engine.check_lengths()
            assert [results[tuple(p)] for p in prompts] == reference, (exits, budgets)


def test_bundled_model_on_two_gpus(ray_gpus):
    """The bundled model split at e_v over two GPUs equals plain greedy on one GPU (fp32)."""
    from transformers import AutoTokenizer

    from hispec.bench.prompts import bundled_heldout_prompts
    from hispec.models import DEFAULT_MODEL
    from hispec.pipeline.build import PipelinedEngine
    from hispec.speculation import resolve_policy

    torch.backends.cuda.matmul.allow_tf32 = False
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    prompts = [tokenizer(p)["input_ids"] for p in bundled_heldout_prompts()[:8]]
    model = load_model(DEFAULT_MODEL, device="cuda")
    reference = [greedy_generate(model, p, 64)[0] for p in prompts]
    del model
    policy = resolve_policy("hispec", 16, DEFAULT_MODEL)
    with PipelinedEngine.start(DEFAULT_MODEL, policy, 2, EngineConfig(max_batch_size=8), device="cuda") as pp:
        results = pp.engine.generate([Request(p, 64) for p in prompts])
    assert [r.token_ids for r in results] == reference
