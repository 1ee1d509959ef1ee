"""`dtype="bfloat16"` on CPU: bf16 weights held widened to fp32, run by the C++ stack's packed
GEMMs on bf16 panels with fp32 activations, accumulation and KV cache (hispec.model.loading.
compute_dtype). On the bundled model (stored in bf16): the packed path runs, and every method's
greedy output equals `ar`'s on the same path."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from hispec.bench.prompts import bundled_heldout_prompts
from hispec.engine import EngineConfig, SpecEngine
from hispec.model import compute_dtype, load_model
from hispec.model.greedy import greedy_generate
from hispec.model.native import native_enabled
from hispec.models import DEFAULT_MODEL
from hispec.speculation import Request, paper_default
from tests.unit.tiny_checkpoints import make_checkpoint

NUM_PROMPTS, NEW_TOKENS = 4, 64
BATCH = 2  # verification blocks of 2 x 5 rows: every step after the prefill fits the packed path (<= 16 rows)
native_only = pytest.mark.skipif(not native_enabled(), reason="HISPEC_NATIVE=0: the Python layer loop was chosen")


def test_compute_dtype_widens_bfloat16_on_cpu_only():
    assert compute_dtype("bfloat16", "cpu") == torch.float32
    assert compute_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
    assert compute_dtype("bfloat16", "cuda") == torch.bfloat16  # CUDA bf16 computes in bf16, unchanged
    assert compute_dtype("float16", "cpu") == torch.float16
    assert compute_dtype("float32", "cuda:0") == torch.float32


@pytest.fixture(scope="module")
def bf16_model():
    return load_model(DEFAULT_MODEL, dtype="bfloat16")


@pytest.fixture(scope="module")
def prompt_ids():
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    return [tokenizer(p)["input_ids"] for p in bundled_heldout_prompts()[:NUM_PROMPTS]]


@native_only
def test_bundled_model_in_bf16_holds_the_checkpoint_weights_on_the_packed_path(bf16_model):
    model = bf16_model
    assert model.weights_dtype == torch.bfloat16 and model.dtype == torch.float32
    stack = model.native_stack
    assert stack is not None and stack.bf16_layers() == model.config.num_layers  # every projection: bf16 panels
    assert model.native_exit_head().bf16()
    # The checkpoint is stored in bf16: widening is exact, so the weights are the float32 load's, bit for bit.
    reference = dict(load_model(DEFAULT_MODEL, dtype="float32", native=False).named_parameters())
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param, reference[name]), name
    cache = model.new_cache(num_slots=1, capacity=64)
    assert cache.keys[0].dtype == cache.values[0].dtype == torch.float32  # the kernels read fp32 K/V
    before = stack.packed_forwards()
    prompt = torch.tensor([[1, 45, 499, 173, 54]])
    with torch.inference_mode():
        model.forward_layers(model.embed(prompt), model.plan(cache, [0], 5), cache, 0, model.config.num_layers)
        model.forward_layers(model.embed(prompt[:, :1]), model.plan(cache, [0], 1), cache, 0, model.config.num_layers)
    assert stack.packed_forwards() == before + 2  # a 5-token block and a decode step, both packed


@native_only
def test_bf16_request_on_a_float32_checkpoint_rounds_the_weights_to_bf16(tmp_path):
    make_checkpoint(tmp_path, "tied-gqa", num_layers=2)
    fp32 = dict(load_model(tmp_path, dtype="float32", native=False).named_parameters())
    model = load_model(tmp_path, dtype="bfloat16")
    assert model.dtype == torch.float32 and model.native_stack.bf16_layers() == 2
    for name, param in model.named_parameters():
        assert torch.equal(param, fp32[name].bfloat16().float()), name
    assert any(not torch.equal(param, fp32[name]) for name, param in model.named_parameters())  # it did round


def test_bf16_without_the_native_stack_runs_the_same_weights_in_the_python_loop(tmp_path):
    make_checkpoint(tmp_path, "tied-gqa", num_layers=2)
    python = load_model(tmp_path, dtype="bfloat16", native=False)
    assert python.dtype == torch.float32 and not python.native_layers
    prompt = [5, 17, 33, 8]
    tokens = greedy_generate(python, prompt, 10)
    if native_enabled():
        assert greedy_generate(load_model(tmp_path, dtype="bfloat16"), prompt, 10) == tokens


@pytest.fixture(scope="module")
def ar_reference(bf16_model, prompt_ids):
    engine = SpecEngine(bf16_model, paper_default("ar", bf16_model.config.num_layers), EngineConfig(max_batch_size=BATCH))
    results = [(r.token_ids, r.finish_reason) for r in engine.generate([Request(ids, NEW_TOKENS) for ids in prompt_ids])]
    assert results == [greedy_generate(bf16_model, ids, NEW_TOKENS, bf16_model.config.eos_token_ids) for ids in prompt_ids]
    return results


@native_only
@pytest.mark.parametrize("method", ["layerskip", "hispec"])
def test_every_method_in_bf16_equals_ar_on_the_same_path(bf16_model, prompt_ids, ar_reference, method):
    stack = bf16_model.native_stack
    before = stack.packed_forwards()
    engine = SpecEngine(bf16_model, paper_default(method, bf16_model.config.num_layers), EngineConfig(max_batch_size=BATCH))
    results = engine.generate([Request(ids, NEW_TOKENS) for ids in prompt_ids])
    assert [(r.token_ids, r.finish_reason) for r in results] == ar_reference
    assert sum(len(tokens) for tokens, _ in ar_reference) >= NUM_PROMPTS * NEW_TOKENS // 2
    stats = engine.total_stats
    assert stats.new_tokens / stats.target_passes > 1.5  # speculation actually happened
    # every draft and verification forward ran packed (each target pass shares a forward with at most BATCH - 1 others)
    assert stack.packed_forwards() - before >= (stats.target_passes - NUM_PROMPTS) / BATCH
