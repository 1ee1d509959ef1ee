"""The bundled early-exit model: loadable by transformers and by us, same greedy output."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hispec.model import load_model
from hispec.model.greedy import greedy_generate
from hispec.models import DEFAULT_MODEL

PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_python_files(root):\n",
    "class Stack:\n    def __init__(self):\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


def test_bundled_checkpoint_is_complete_and_small():
    files = {p.name for p in DEFAULT_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files
    assert (DEFAULT_MODEL / "model.safetensors").stat().st_size < 50 * 2**20
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert config["num_hidden_layers"] >= 16


@pytest.mark.parametrize("prompt", PROMPTS)
def test_transformers_greedy_equals_ours(tokenizer, prompt):
    hf = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    ours = load_model(DEFAULT_MODEL, dtype=torch.float32)
    prompt_ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        hf_out = hf.generate(
            torch.tensor([prompt_ids]), max_new_tokens=48, do_sample=False, eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(prompt_ids):].tolist()
    ours_out, finish = greedy_generate(ours, prompt_ids, 48)
    assert finish == "length"
    assert ours_out == hf_out
