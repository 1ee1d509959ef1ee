"""Our runtime against transformers' LlamaForCausalLM: logits at every exit, fp32, 1e-4."""

from __future__ import annotations

import pytest
import torch

from hispec.model import EarlyExitModel, load_model
from tests.unit.tiny_checkpoints import VARIANTS, hf_exit_logits, make_checkpoint

ATOL = 1e-4
NUM_LAYERS = 4


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = make_checkpoint(directory, request.param, NUM_LAYERS)
    return hf, load_model(directory), directory


def run_all_exits(model: EarlyExitModel, cache, slots, ids: torch.Tensor, num_tokens=None) -> list[torch.Tensor]:
    """Advance `slots` by `ids` [B, T] one layer at a time; logits [B, T, V] after every layer."""
    num_tokens = ids.shape[1] if num_tokens is None else num_tokens
    hidden = model.embed(ids)
    exits = []
    for layer in range(model.config.num_layers):
        step = model.plan(cache, slots, num_tokens, layer=layer)
        hidden = model.forward_layers(hidden, step, cache, layer, layer + 1)
        exits.append(model.exit_logits(hidden))
    return exits


def assert_exits_close(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    assert len(ours) == len(ref) == NUM_LAYERS
    for layer, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape
        err = (a - b).abs().max().item()
        assert err < ATOL, f"exit after layer {layer + 1}: max abs diff {err}"
        assert b.abs().max() > 1e-2, "reference logits are too small to make the test meaningful"


def test_config_read(pair):
    hf, ours, _ = pair
    assert ours.config.num_key_value_heads == hf.config.num_key_value_heads
    assert ours.config.tie_word_embeddings == hf.config.tie_word_embeddings
    if hf.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.embed_tokens.weight


def test_prefill_every_exit(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, 101, (1, 23), generator=torch.Generator().manual_seed(1))
    cache = ours.new_cache(num_slots=2, capacity=64)
    assert_exits_close(run_all_exits(ours, cache, [1], ids), hf_exit_logits(hf, ids))


def test_incremental_decode_every_exit(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(2))
    reference = hf_exit_logits(hf, ids)
    cache = ours.new_cache(num_slots=1, capacity=64)
    run_all_exits(ours, cache, [0], ids[:, :12])
    for t in range(12, 20):
        ours_t = run_all_exits(ours, cache, [0], ids[:, t : t + 1])
        assert_exits_close(ours_t, [r[:, t : t + 1] for r in reference])
    assert cache.length(0, 0) == 20


def test_chunk_after_rollback_every_exit(pair):
    hf, ours, _ = pair
    gen = torch.Generator().manual_seed(3)
    prompt, rejected, accepted = (torch.randint(0, 101, (1, n), generator=gen) for n in (15, 4, 5))
    cache = ours.new_cache(num_slots=1, capacity=64)
    run_all_exits(ours, cache, [0], prompt)
    run_all_exits(ours, cache, [0], rejected)  # a speculative chunk the target rejects...
    cache.rollback((0, NUM_LAYERS), [0], [15 + 1])  # ...after its first token
    ours_chunk = run_all_exits(ours, cache, [0], accepted)
    full = torch.cat([prompt, rejected[:, :1], accepted], dim=1)
    reference = hf_exit_logits(hf, full)
    assert_exits_close(ours_chunk, [r[:, 16:] for r in reference])


def test_ragged_batch_with_noncontiguous_slots(pair):
    """Sequences of different lengths, bringing different token counts, in slots 3 and 0."""
    hf, ours, _ = pair
    gen = torch.Generator().manual_seed(4)
    a = torch.randint(0, 101, (1, 17), generator=gen)
    b = torch.randint(0, 101, (1, 9), generator=gen)
    cache = ours.new_cache(num_slots=4, capacity=64)
    run_all_exits(ours, cache, [3], a[:, :14])
    run_all_exits(ours, cache, [0], b[:, :8])
    step_ids = torch.zeros((2, 3), dtype=torch.long)
    step_ids[0], step_ids[1, :1] = a[0, 14:], b[0, 8:]
    ours_step = run_all_exits(ours, cache, [3, 0], step_ids, num_tokens=[3, 1])
    ref_a, ref_b = hf_exit_logits(hf, a), hf_exit_logits(hf, b)
    assert_exits_close([o[:1] for o in ours_step], [r[:, 14:] for r in ref_a])
    assert_exits_close([o[1:, :1] for o in ours_step], [r[:, 8:] for r in ref_b])
    assert [cache.length(0, s) for s in (3, 0)] == [17, 9]


def test_multi_layer_forward_and_causal_path(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(5))
    reference = hf_exit_logits(hf, ids)
    cache = ours.new_cache(num_slots=2, capacity=32)
    step = ours.plan(cache, [0, 1], 11)
    final = ours.exit_logits(ours.forward_layers(ours.embed(ids), step, cache, 0, NUM_LAYERS))
    assert (final - reference[-1]).abs().max() < ATOL
    causal = ours.causal_hidden_states(ids, exits=range(1, NUM_LAYERS + 1))
    assert_exits_close([ours.exit_logits(h) for h in causal], reference)
