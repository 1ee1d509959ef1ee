"""A model part reads and holds only its own layers (plus embeddings / head when asked)."""

from __future__ import annotations

import pytest
import torch

from hispec.model import load_model
from hispec.model.checkpoint import CheckpointReader
from tests.unit.tiny_checkpoints import make_checkpoint

NUM_LAYERS = 6


@pytest.fixture(scope="module", params=["untied-mha", "tied-gqa", "sharded-bias"])
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return make_checkpoint(directory, request.param, NUM_LAYERS), directory


def layer_names(hf_model, layers) -> set[str]:
    return {n for n in hf_model.state_dict() if any(n.startswith(f"model.layers.{i}.") for i in layers)}


@pytest.mark.parametrize(
    "layer_range, embeddings, head",
    [((0, 2), True, False), ((2, 5), False, False), ((5, 6), False, True), ((0, 6), True, True)],
)
def test_part_reads_and_holds_only_its_tensors(checkpoint, layer_range, embeddings, head):
    hf, directory = checkpoint
    tied = hf.config.tie_word_embeddings
    part = load_model(directory, layer_range=layer_range, with_embeddings=embeddings, with_head=head)

    expected = layer_names(hf, range(*layer_range))
    if embeddings or (head and tied):
        expected.add("model.embed_tokens.weight")
    if head:
        expected.add("model.norm.weight")
        if not tied:
            expected.add("lm_head.weight")
    assert part.loaded_tensor_names == expected

    # Every parameter is materialized (no meta tensors) and the count is exactly the owned share.
    hf_params = dict(hf.named_parameters(remove_duplicate=False))
    expected_count = sum(hf_params[n].numel() for n in expected)
    held = {id(p): p for p in part.parameters()}  # a tied head shares the embedding tensor
    assert not any(p.is_meta for p in held.values())
    assert sum(p.numel() for p in held.values()) == expected_count
    assert sorted(part.layers.keys(), key=int) == [str(i) for i in range(*layer_range)]
    assert (part.embed_tokens is not None) == embeddings
    assert (part.lm_head is not None) == head


def test_parts_chain_to_the_full_model(checkpoint):
    """Stages [0,2)+embeddings, [2,4), [4,6)+head, each with its own cache, equal the full model."""
    _, directory = checkpoint
    full = load_model(directory)
    stages = [
        load_model(directory, layer_range=(0, 2), with_embeddings=True, with_head=False),
        load_model(directory, layer_range=(2, 4), with_embeddings=False, with_head=False),
        load_model(directory, layer_range=(4, 6), with_embeddings=False, with_head=True),
    ]
    ids = torch.randint(0, 101, (1, 10), generator=torch.Generator().manual_seed(0))
    full_cache = full.new_cache(1, 16)
    expected = full.exit_logits(full.forward_layers(full.embed(ids), full.plan(full_cache, [0], 10), full_cache, 0, 6))
    hidden = stages[0].embed(ids)
    for stage in stages:
        cache = stage.new_cache(1, 16)
        hidden = stage.forward_layers(hidden, stage.plan(cache, [0], 10), cache, *stage.layer_range)
    assert torch.equal(stages[-1].exit_logits(hidden), expected)


def test_sharded_reader_opens_only_needed_files(tmp_path):
    make_checkpoint(tmp_path, "sharded-bias", NUM_LAYERS)
    reader = CheckpointReader(tmp_path)
    assert len(set(reader.file_of.values())) > 2, "the fixture should produce several shards"
    reader.get("model.layers.0.self_attn.q_proj.weight")
    assert len(reader._handles) == 1
    assert reader.names_read == {"model.layers.0.self_attn.q_proj.weight"}


def test_bad_ranges_are_rejected(checkpoint):
    _, directory = checkpoint
    with pytest.raises(ValueError, match="layer range"):
        load_model(directory, layer_range=(4, 9))
    part = load_model(directory, layer_range=(0, 2), with_head=False)
    with pytest.raises(RuntimeError, match="exit head"):
        part.exit_logits(torch.zeros(1, 1, 64))


def test_pickled_weights_are_never_loaded(tmp_path):
    """Checkpoints load from safetensors only: a pickle (`pytorch_model.bin`) can run code when it is
    read, so a directory holding only one is refused, and the pickle is not opened."""
    import shutil

    import torch

    from hispec.model import load_model
    from hispec.models import DEFAULT_MODEL

    shutil.copy(DEFAULT_MODEL / "config.json", tmp_path / "config.json")
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path)
