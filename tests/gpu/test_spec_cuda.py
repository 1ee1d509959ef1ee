"""The speculation engine on a CUDA device (skipped without CUDA): greedy equality at every
depth, and seeded sampling that does not depend on the batch."""

from __future__ import annotations

import pytest
import torch

from hispec.model import load_model
from hispec.model.greedy import greedy_generate
from hispec.engine import EngineConfig, SpecEngine
from hispec.speculation import Hierarchy, Request, SamplingParams
from tests.unit.spec_helpers import GRID, random_prompts
from tests.unit.tiny_checkpoints import make_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 so argmax ties do not flip
    directory = tmp_path_factory.mktemp("tiny6")
    make_checkpoint(directory, "tied-gqa", num_layers=6)
    return load_model(directory, device="cuda")


def test_greedy_equality_on_cuda(model):
    prompts = random_prompts((1, 4, 9, 15), model.config.vocab_size)
    reference = [greedy_generate(model, p, 30)[0] for p in prompts]
    for exits, budgets in GRID:
        engine = SpecEngine(model, Hierarchy(6, exits, budgets), EngineConfig(max_batch_size=3))
        results = engine.generate([Request(p, 30, stop_token_ids=()) for p in prompts])
        assert [r.token_ids for r in results] == reference, (exits, budgets)


def test_seeded_sampling_on_cuda_is_batch_independent(model):
    prompts = random_prompts((3, 7, 2), model.config.vocab_size, seed=2)
    requests = lambda: [Request(p, 16, SamplingParams(1.0, top_p=0.9, seed=i), stop_token_ids=())
                        for i, p in enumerate(prompts)]
    hierarchy = Hierarchy(6, (1, 3), (2, 3))
    alone = [SpecEngine(model, hierarchy, EngineConfig(max_batch_size=1)).generate([r])[0].token_ids
             for r in requests()]
    together = [r.token_ids for r in SpecEngine(model, hierarchy, EngineConfig(max_batch_size=3)).generate(requests())]
    assert alone == together
