"""Static KV cache: append moves lengths forward, rollback moves them back without copies."""

from __future__ import annotations

import pytest
import torch

from hispec.config import ModelConfig
from hispec.model import EarlyExitModel


def tiny_model(num_layers=3) -> EarlyExitModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
    )
    model = EarlyExitModel(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model


@torch.no_grad()
def test_rollback_moves_lengths_without_copying():
    model = tiny_model()
    cache = model.new_cache(num_slots=2, capacity=16)
    pointers = [k.data_ptr() for k in cache.keys]
    ids = torch.randint(0, 50, (1, 6))
    model.forward_layers(model.embed(ids), model.plan(cache, [1], 6), cache, 0, 3)
    before = [cache.keys[i][1, :, :4].clone() for i in range(3)]
    cache.rollback((1, 3), [1], [4])  # deep layers reject the last two tokens
    assert cache.lengths[:, 1].tolist() == [6, 4, 4]
    assert cache.lengths[:, 0].tolist() == [0, 0, 0]
    assert [k.data_ptr() for k in cache.keys] == pointers
    assert all(torch.equal(cache.keys[i][1, :, :4], before[i]) for i in range(3))
    assert cache.slot_tensors(2, 1)[0].shape == (2, 4, 8)


def test_rollback_cannot_extend_and_capacity_is_enforced():
    model = tiny_model()
    cache = model.new_cache(num_slots=1, capacity=8)
    with pytest.raises(ValueError, match="cannot extend"):
        cache.rollback((0, 3), [0], [1])
    with torch.no_grad():
        model.forward_layers(model.embed(torch.zeros(1, 8, dtype=torch.long)), model.plan(cache, [0], 8), cache, 0, 3)
    with pytest.raises(ValueError, match="context length limit"):
        model.plan(cache, [0], 1)


@torch.no_grad()
def test_forward_refuses_layers_out_of_step():
    model = tiny_model()
    cache = model.new_cache(num_slots=1, capacity=8)
    step = model.plan(cache, [0], 2)
    model.forward_layers(model.embed(torch.zeros(1, 2, dtype=torch.long)), step, cache, 0, 1)
    # layer 1 is still at length 0 but a plan taken at layer 0 starts at 2
    with pytest.raises(ValueError, match="do not match"):
        model.forward_layers(torch.zeros(1, 1, 32), model.plan(cache, [0], 1, layer=0), cache, 1, 2)


@torch.no_grad()
def test_release_frees_slot_and_padding_never_leaks():
    model = tiny_model()
    cache = model.new_cache(num_slots=2, capacity=8)
    ids = torch.randint(0, 50, (2, 4))
    # slot 0 brings 4 tokens, slot 1 only 1: slot 1's padding goes to the scratch column
    model.forward_layers(model.embed(ids), model.plan(cache, [0, 1], [4, 1]), cache, 0, 3)
    assert cache.lengths[:, 0].tolist() == [4, 4, 4] and cache.lengths[:, 1].tolist() == [1, 1, 1]
    assert torch.count_nonzero(cache.keys[0][1, :, 1:8]) == 0
    cache.release([0])
    assert cache.lengths[:, 0].tolist() == [0, 0, 0]


def test_duplicate_slots_rejected():
    model = tiny_model()
    cache = model.new_cache(num_slots=2, capacity=8)
    with pytest.raises(ValueError, match="duplicate"):
        model.plan(cache, [1, 1], 1)
