"""The runtime on a CUDA device: parity with transformers at every exit (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from hispec.model import load_model
from tests.unit.test_model_parity import run_all_exits
from tests.unit.tiny_checkpoints import hf_exit_logits, make_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("variant", ["tied-gqa", "llama3-rope-gqa"])
def test_every_exit_matches_transformers_on_cuda(tmp_path, variant):
    hf = make_checkpoint(tmp_path, variant, num_layers=4)
    ours = load_model(tmp_path, device="cuda")
    ids = torch.randint(0, 101, (1, 19), generator=torch.Generator().manual_seed(0))
    reference = hf_exit_logits(hf, ids)
    cache = ours.new_cache(num_slots=2, capacity=64)
    ours_prefill = run_all_exits(ours, cache, [1], ids[:, :15].cuda())
    ours_decode = [run_all_exits(ours, cache, [1], ids[:, t : t + 1].cuda()) for t in range(15, 19)]
    for layer in range(4):
        got = torch.cat([ours_prefill[layer]] + [d[layer] for d in ours_decode], dim=1).cpu()
        assert (got - reference[layer]).abs().max() < 1e-3  # TF32 matmuls may be on
