"""The KV cache is planned from a memory budget: how many sequences of what length, before anything
is allocated; and an engine on a Llama-2-7B-shaped checkpoint starts within a stated budget."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hispec.config import EngineConfig, ModelConfig
from hispec.engine import SpecEngine
from hispec.errors import InvalidRequest
from hispec.kv.budget import available_memory, kv_bytes_per_token, pipeline_available_bytes, plan_kv_cache
from hispec.model import load_model
from hispec.model.greedy import greedy_generate
from hispec.models import DEFAULT_MODEL
from hispec.speculation import Hierarchy, Request

GiB, MiB = 1 << 30, 1 << 20

# meta-llama/Llama-2-7b-hf's config.json, the fields the runtime reads
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
}


@pytest.fixture(scope="module")
def llama2_7b() -> ModelConfig:
    config = ModelConfig.from_hf_dict(LLAMA2_7B)
    assert (config.head_dim, config.num_layers) == (128, 32)
    return config


def test_llama2_7b_full_context_for_64_sequences_would_take_137_gb(llama2_7b):
    assert kv_bytes_per_token(llama2_7b, torch.float16) == 2 * 32 * 32 * 128 * 2 == 512 * 1024  # 0.5 MiB a token
    layout = plan_kv_cache(llama2_7b, EngineConfig(max_batch_size=64, kv_cache_memory=1 << 40), torch.float16, None)
    assert (layout.num_slots, layout.capacity) == (64, 4096)
    assert layout.total_bytes == 64 * 4096 * 512 * 1024 == 137_438_953_472  # 128 GiB: ~137 GB
    assert round(layout.total_bytes / 1e9) == 137


def test_llama2_7b_in_8_gib_holds_4_sequences_of_4096_tokens(llama2_7b):
    layout = plan_kv_cache(llama2_7b, EngineConfig(max_batch_size=64, kv_cache_memory=8 * GiB), torch.float16, None)
    assert (layout.num_slots, layout.capacity, layout.total_bytes) == (4, 4096, 8 * GiB)
    assert layout.describe() == "KV cache: 4 sequences x 4096 tokens, 8192 MiB (budget 8192 MiB)"
    shorter = plan_kv_cache(llama2_7b, EngineConfig(max_batch_size=64, max_context=1024, kv_cache_memory=8 * GiB),
                            torch.float16, None)
    assert (shorter.num_slots, shorter.capacity) == (16, 1024)
    capped = plan_kv_cache(llama2_7b, EngineConfig(max_batch_size=3, kv_cache_memory=8 * GiB), torch.float16, None)
    assert capped.num_slots == 3 and capped.total_bytes == 6 * GiB  # max_batch_size still bounds it


def test_budget_by_fraction_of_available_memory(llama2_7b):
    by_default = plan_kv_cache(llama2_7b, EngineConfig(max_batch_size=64), torch.float16, 20 * GiB)
    assert by_default.budget_bytes == 10 * GiB and by_default.num_slots == 5  # 0.5 of 20 GiB, 2 GiB a sequence
    by_fraction = plan_kv_cache(llama2_7b, EngineConfig(max_batch_size=64, kv_cache_memory_fraction=0.9),
                                torch.float16, 20 * GiB)
    assert by_fraction.num_slots == 9
    with pytest.raises(ValueError, match="available memory"):
        plan_kv_cache(llama2_7b, EngineConfig(), torch.float16, None)


def test_a_budget_below_one_sequence_says_what_to_lower(llama2_7b):
    with pytest.raises(ValueError, match=r"1024.0 MiB, does not hold one sequence of 4096 tokens \(2048.0 MiB.*"
                                         r"lower max_context or raise the budget"):
        plan_kv_cache(llama2_7b, EngineConfig(kv_cache_memory=GiB), torch.float16, None)
    assert plan_kv_cache(llama2_7b, EngineConfig(max_context=2048, kv_cache_memory=GiB), torch.float16, None).num_slots == 1


def test_engine_config_takes_one_budget():
    with pytest.raises(ValueError, match="not both"):
        EngineConfig(kv_cache_memory=GiB, kv_cache_memory_fraction=0.5)
    with pytest.raises(ValueError, match="kv_cache_memory_fraction"):
        EngineConfig(kv_cache_memory_fraction=1.5)
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        EngineConfig(prefill_chunk_tokens=0)


def test_pipeline_budget_follows_the_tightest_memory_pool():
    ranges = [(0, 8), (8, 32)]
    # one GPU each: stage 1 holds 24 of 32 layers on 12 GiB free -> 16 GiB model-wide
    assert pipeline_available_bytes(ranges, [40 * GiB, 12 * GiB]) == 16 * GiB
    # both on one node's memory: they share its 10 GiB
    assert pipeline_available_bytes(ranges, [10 * GiB, 10 * GiB], [("cpu", "n1"), ("cpu", "n1")]) == 10 * GiB


def test_available_memory_of_this_cpu():
    total = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                 if line.startswith("MemTotal:"))
    assert 0 < available_memory("cpu") <= total


def test_the_bundled_model_keeps_its_16_sequences():
    """Its KV is small: 16 sequences of 512 tokens in float32 take 32 MiB of a default budget."""
    config = ModelConfig.from_pretrained(DEFAULT_MODEL)
    layout = plan_kv_cache(config, EngineConfig(), torch.float32, available_memory("cpu"))
    assert (layout.num_slots, layout.capacity, layout.total_bytes) == (16, 512, 16 * 512 * 2 * 16 * 2 * 64 * 4)


# ---- an engine on a Llama-2-7B-shaped checkpoint -------------------------------------------------
LAYERS = 2


@pytest.fixture(scope="module")
def llama_shaped_dir(tmp_path_factory) -> Path:
    """Llama-2-7B's shapes (hidden 4096, 32 heads, MLP 11008, vocab 32000, 4096 positions) with
    random weights and only 2 layers, in bfloat16 on disk (1.3 GB)."""
    directory = tmp_path_factory.mktemp("llama2-7b-shaped")
    (directory / "config.json").write_text(json.dumps({**LLAMA2_7B, "num_hidden_layers": LAYERS,
                                                       "torch_dtype": "bfloat16"}))
    generator = torch.Generator().manual_seed(0)
    d, inter, vocab = 4096, 11008, 32000

    def weight(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0, std, generator=generator)

    tensors = {"model.embed_tokens.weight": weight(vocab, d, std=1.0), "model.norm.weight": torch.ones(d, dtype=torch.bfloat16),
               "lm_head.weight": weight(vocab, d)}
    for i in range(LAYERS):
        prefix = f"model.layers.{i}"
        tensors |= {f"{prefix}.input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
                    f"{prefix}.post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16)}
        tensors |= {f"{prefix}.self_attn.{p}_proj.weight": weight(d, d) for p in "qkvo"}
        tensors |= {f"{prefix}.mlp.gate_proj.weight": weight(inter, d), f"{prefix}.mlp.up_proj.weight": weight(inter, d),
                    f"{prefix}.mlp.down_proj.weight": weight(d, inter)}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def test_llama_shaped_engine_starts_within_its_budget(llama_shaped_dir, caplog):
    model = load_model(llama_shaped_dir, dtype="bfloat16")
    # bfloat16 on CPU: bf16 weights, fp32 activations and KV cache (docs/runtime.md, "bfloat16 on CPU")
    assert model.weights_dtype == torch.bfloat16 and model.dtype == torch.float32 and model.config.hidden_size == 4096
    config = EngineConfig(max_batch_size=64, kv_cache_memory=600 * MiB)
    with caplog.at_level(logging.INFO, logger="hispec.engine.engine"):
        engine = SpecEngine(model, Hierarchy(LAYERS), config)
    # 2 layers x K, V x 32 heads x 128 x 4 bytes = 64 KiB a token; 4096 columns = 256 MiB a sequence
    planned = plan_kv_cache(model.config, config, model.dtype, None)
    assert (planned.num_slots, planned.capacity, planned.bytes_per_token) == (2, 4096, 64 * 1024)
    assert (engine.kv_layout.num_slots, engine.kv_layout.capacity) == (engine.num_slots, engine.capacity) == (2, 4096)
    cache = engine.executor.stages[0].cache
    allocated = sum(t.numel() * t.element_size() for t in (*cache.keys, *cache.values))
    assert allocated == planned.total_bytes == engine.kv_layout.total_bytes == 512 * MiB
    assert engine.scheduler.free_slots == [0, 1]
    assert "KV cache: 2 sequences x 4096 tokens, 512 MiB (budget 600 MiB)" in caplog.messages
    with pytest.raises(InvalidRequest) as refused:
        engine.add_request(Request(list(range(4000)), 97))
    assert refused.value.field == "max_new_tokens"
    prompts = [[1, 450, 4996, 17354], [1, 306, 763]]
    results = engine.generate([Request(p, 4, stop_token_ids=()) for p in prompts])
    assert [r.token_ids for r in results] == [greedy_generate(model, p, 4)[0] for p in prompts]
