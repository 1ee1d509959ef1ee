"""Tiny random Llama checkpoints written with `transformers.save_pretrained`, as the parity
reference for our runtime."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VARIANTS = {
    # name: (LlamaConfig overrides, save_pretrained kwargs)
    "untied-mha": (dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False), {}),
    "tied-gqa": (dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True), {}),
    "llama3-rope-gqa": (
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=16,
            ),
        ),
        {},
    ),
    "sharded-bias": (
        dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
        dict(max_shard_size="60KB"),
    ),
}


def make_checkpoint(
    directory: Path,
    variant: str,
    num_layers: int = 4,
    seed: int = 0,
    *,
    vocab_size: int = 101,
    max_position_embeddings: int = 256,
    initializer_range: float = 0.08,
    eos_token_id: int = 2,
) -> LlamaForCausalLM:
    overrides, save_kwargs = VARIANTS[variant]
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=112, num_hidden_layers=num_layers,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
        initializer_range=initializer_range, eos_token_id=eos_token_id, **overrides,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    if config.attention_bias or config.mlp_bias:  # HF initializes biases to zero; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.05)
    model.save_pretrained(directory, **save_kwargs)
    return model


def hf_exit_logits(model: LlamaForCausalLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """Logits [B, T, V] at every exit 1..L: shared norm + head on each layer's output."""
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        hidden = out.hidden_states  # [embeddings, layer 1, ..., layer L-1, norm(layer L)]
        exits = [model.lm_head(model.model.norm(h)) for h in hidden[1:-1]]
    return exits + [out.logits]
