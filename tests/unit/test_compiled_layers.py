"""The torch.compile'd layer loop gives the same tokens and logits as the default runtime (the C++
layer stack; the Python loop under HISPEC_NATIVE=0)."""

from __future__ import annotations

import torch

from hispec.model import load_model
from hispec.model.greedy import greedy_generate
from hispec.model.native import native_enabled
from tests.unit.tiny_checkpoints import make_checkpoint


def test_compiled_greedy_and_ragged_step_equal_eager(tmp_path):
    make_checkpoint(tmp_path, "tied-gqa", num_layers=3)
    eager = load_model(tmp_path)
    compiled = load_model(tmp_path).compile_layers()
    assert eager.native_layers == native_enabled() and not compiled.native_layers  # a failed build fails here too
    prompt = torch.randint(0, 101, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    assert greedy_generate(compiled, prompt, 24) == greedy_generate(eager, prompt, 24)

    ids = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(1))
    outputs = []
    for model in (eager, compiled):
        cache = model.new_cache(num_slots=3, capacity=32)
        with torch.inference_mode():
            model.forward_layers(model.embed(ids[:1]), model.plan(cache, [2], 5), cache, 0, 3)
            step = model.plan(cache, [2, 0], [2, 5])  # ragged: masked attention, scattered writes
            outputs.append(model.exit_logits(model.forward_layers(model.embed(ids), step, cache, 0, 3)))
    assert torch.allclose(outputs[0][0, :2], outputs[1][0, :2], atol=1e-4)
    assert torch.allclose(outputs[0][1], outputs[1][1], atol=1e-4)
