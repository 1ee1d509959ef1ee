"""Writing and reading training checkpoints.

A checkpoint directory is a standard HF Llama checkpoint (config.json, generation_config.json,
model.safetensors, tokenizer files) that both `hispec.model.load_model` and
`transformers.AutoModelForCausalLM.from_pretrained` load. Intermediate checkpoints also hold
`state.pt` (optimizer, step, RNG) so a run resumes exactly; their weights are fp32 for that.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from hispec.config import ModelConfig
from hispec.model import load_model
from hispec.model.checkpoint import save_safetensors
from hispec.model.model import EarlyExitModel
from hispec.train.tokenizer import save_hf_tokenizer

STATE_FILE = "state.pt"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def hf_config_dict(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """`config.json` for a LlamaForCausalLM, readable by transformers 4.x and 5.x."""
    eos = list(cfg.eos_token_ids)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        # 5.x reads rope_parameters, 4.x reads rope_theta (+ rope_scaling); write both.
        "rope_theta": cfg.rope.theta,
        "rope_parameters": {"rope_theta": cfg.rope.theta, "rope_type": "default"},
        "rope_scaling": None,
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": cfg.mlp_bias,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_cache": True,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": None,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def save_checkpoint(
    model: EarlyExitModel, tok: Tokenizer, path: str | Path, dtype: str, pad_id: int | None = None
) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    save_safetensors(model, path, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
    config = hf_config_dict(cfg, dtype)
    config["pad_token_id"] = pad_id
    (path / "config.json").write_text(json.dumps(config, indent=2))
    generation = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": pad_id,
        "do_sample": False,
    }
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    save_hf_tokenizer(tok, path)
    return path


def save_training_state(path: Path, step: int, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                        elapsed_s: float) -> None:
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "elapsed_s": elapsed_s,
        },
        path / STATE_FILE,
    )


def load_weights_into(model: EarlyExitModel, path: Path) -> None:
    """Copy the checkpoint's weights (fp32 from an intermediate checkpoint) into `model`."""
    loaded = load_model(path, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = []
    for p in Path(out_dir).glob("checkpoint-*"):
        m = _CHECKPOINT_RE.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def prune_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` intermediate checkpoints (each is an fp32 copy)."""
    found = sorted(
        (int(m.group(1)), p) for p in Path(out_dir).glob("checkpoint-*") if (m := _CHECKPOINT_RE.match(p.name))
    )
    for _, p in found[: max(0, len(found) - keep)]:
        shutil.rmtree(p)
