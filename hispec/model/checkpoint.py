"""Hugging Face Llama checkpoints on local disk: reading (lazily, tensor by tensor), the
name mapping between HF's separate projections and our fused ones, and writing.

Only the tensors a model part needs are read: safetensors files are opened lazily and each
tensor is fetched by name, so a pipeline stage never materializes weights it does not own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hispec.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"


class CheckpointReader:
    """Lazy access to the tensors of a (single-file or sharded) safetensors checkpoint."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.is_file():
            self.file_of = {name: self.path / f for name, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in {self.path}")
            self.file_of = {}
            for f in files:
                with safe_open(f, framework="pt") as handle:
                    self.file_of.update({name: f for name in handle.keys()})
        self._handles: dict[Path, object] = {}
        self.names_read: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise KeyError(f"tensor {name!r} not found in checkpoint {self.path}")
        f = self.file_of[name]
        if f not in self._handles:
            self._handles[f] = safe_open(f, framework="pt")
        self.names_read.add(name)
        return self._handles[f].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


def layer_tensor_map(cfg: ModelConfig, layer: int) -> dict[str, list[str]]:
    """Our parameter name -> the HF tensor names concatenated (along dim 0) to form it."""
    ours, hf = f"layers.{layer}", f"model.layers.{layer}"
    attn, mlp = f"{hf}.self_attn", f"{hf}.mlp"
    mapping = {
        f"{ours}.input_norm": [f"{hf}.input_layernorm.weight"],
        f"{ours}.qkv_proj.weight": [f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight"],
        f"{ours}.o_proj.weight": [f"{attn}.o_proj.weight"],
        f"{ours}.post_attention_norm": [f"{hf}.post_attention_layernorm.weight"],
        f"{ours}.gate_up_proj.weight": [f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"],
        f"{ours}.down_proj.weight": [f"{mlp}.down_proj.weight"],
    }
    if cfg.attention_bias:
        mapping[f"{ours}.qkv_proj.bias"] = [f"{attn}.q_proj.bias", f"{attn}.k_proj.bias", f"{attn}.v_proj.bias"]
        mapping[f"{ours}.o_proj.bias"] = [f"{attn}.o_proj.bias"]
    if cfg.mlp_bias:
        mapping[f"{ours}.gate_up_proj.bias"] = [f"{mlp}.gate_proj.bias", f"{mlp}.up_proj.bias"]
        mapping[f"{ours}.down_proj.bias"] = [f"{mlp}.down_proj.bias"]
    return mapping


def tensor_map(
    cfg: ModelConfig, layers: Iterable[int], *, embeddings: bool, head: bool
) -> dict[str, list[str]]:
    """Our parameter names -> HF names for a model part. With tied embeddings the head reads
    the embedding matrix."""
    mapping: dict[str, list[str]] = {}
    if embeddings:
        mapping["embed_tokens.weight"] = ["model.embed_tokens.weight"]
    for layer in layers:
        mapping.update(layer_tensor_map(cfg, layer))
    if head:
        mapping["norm"] = ["model.norm.weight"]
        mapping["lm_head.weight"] = ["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
    return mapping


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our (full) model's parameters under HF Llama names, fused tensors split back."""
    cfg: ModelConfig = model.config
    ours = dict(model.named_parameters(remove_duplicate=False))
    out: dict[str, torch.Tensor] = {}
    for name, hf_names in tensor_map(cfg, range(*model.layer_range), embeddings=True, head=True).items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # stored once, as the embedding
        sizes = [_rows(cfg, n) for n in hf_names]
        for hf_name, part in zip(hf_names, ours[name].detach().split(sizes, dim=0)):
            out[hf_name] = part.contiguous()
    return out


def _rows(cfg: ModelConfig, hf_name: str) -> int:
    """Rows (dim 0) of an HF tensor, to split a fused tensor back into its parts."""
    leaf = hf_name.split(".")[-2]
    q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {
        "q_proj": q_dim, "k_proj": kv_dim, "v_proj": kv_dim, "o_proj": cfg.hidden_size,
        "gate_proj": cfg.intermediate_size, "up_proj": cfg.intermediate_size, "down_proj": cfg.hidden_size,
        "input_layernorm": cfg.hidden_size, "post_attention_layernorm": cfg.hidden_size,
        "norm": cfg.hidden_size, "embed_tokens": cfg.vocab_size, "lm_head": cfg.vocab_size,
    }[leaf]


def save_safetensors(model: torch.nn.Module, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the model's weights as `model.safetensors` under HF names (config written by the caller)."""
    tensors = hf_state_dict(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    out = Path(path) / "model.safetensors"
    save_file(tensors, str(out), metadata={"format": "pt"})
    return out
