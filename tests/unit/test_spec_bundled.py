"""The engine on the bundled model: 50 held-out prompts x 128 tokens, every method equal to plain
greedy decoding and to transformers' greedy `generate`; stop strings with the real tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hispec.bench.prompts import bundled_heldout_prompts
from hispec.model import load_model
from hispec.model.greedy import greedy_generate
from hispec.models import DEFAULT_MODEL
from hispec.engine import EngineConfig, SpecEngine
from hispec.speculation import Request, paper_default
from hispec.speculation.request import cut_at_stop

NUM_PROMPTS, NEW_TOKENS = 50, 128
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def model():
    return load_model(DEFAULT_MODEL, dtype=torch.float32)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    prompts = bundled_heldout_prompts()[:NUM_PROMPTS]
    assert len(prompts) == NUM_PROMPTS
    return [tokenizer(p)["input_ids"] for p in prompts]


@pytest.fixture(scope="module")
def reference(model, prompt_ids):
    return [greedy_generate(model, ids, NEW_TOKENS, model.config.eos_token_ids) for ids in prompt_ids]


@pytest.mark.parametrize("method", ["ar", "layerskip", "hispec"])
def test_every_method_equals_greedy(model, prompt_ids, reference, method):
    engine = SpecEngine(model, paper_default(method, model.config.num_layers), EngineConfig(max_batch_size=10))
    results = engine.generate([Request(ids, NEW_TOKENS) for ids in prompt_ids])
    assert [(r.token_ids, r.finish_reason) for r in results] == reference
    if method != "ar":
        stats = engine.total_stats
        assert stats.new_tokens / stats.target_passes > 1.5  # speculation actually happened


def test_equals_transformers_generate(model, prompt_ids, reference):
    hf = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    for ids, (ours, _) in zip(prompt_ids, reference):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=list(model.config.eos_token_ids), pad_token_id=2)
        assert out[0, len(ids):].tolist() == ours


def test_stop_strings_cut_at_the_earliest_match(model, tokenizer, prompt_ids, reference):
    engine = SpecEngine(model, paper_default("hispec", model.config.num_layers), EngineConfig(max_batch_size=4),
                        detokenize=lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    stops = ("\n\n", "return")
    results = engine.generate([Request(ids, NEW_TOKENS, stop_strings=stops) for ids in prompt_ids[:12]])
    stopped = 0
    for result, (full, _) in zip(results, reference):
        assert result.token_ids == full[: len(result.token_ids)]
        text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
        if result.stop_string is not None:
            stopped += 1
            assert result.finish_reason == "stop" and cut_at_stop(text, stops)[1] == result.stop_string
            # the last token completed the stop string: one fewer token does not contain it
            assert cut_at_stop(tokenizer.decode(result.token_ids[:-1], skip_special_tokens=True), stops)[1] is None
        else:
            assert cut_at_stop(text, stops)[1] is None
    assert stopped >= 4  # 5 of these 12 prompts hit a stop string
