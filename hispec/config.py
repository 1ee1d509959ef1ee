"""Frozen configuration objects, validated once where they enter the program.

`ModelConfig` is the architecture of a Llama-family checkpoint, read from its Hugging Face
`config.json`. Everything downstream (runtime, KV cache, loaders) takes this object, never the
raw dict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters (HF `rope_scaling` / `rope_parameters`)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only: wavelengths longer than original_max / low_freq_factor are scaled by
    # `factor`, shorter than original_max / high_freq_factor are kept, in between blended.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in _SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope type {self.rope_type!r} is not supported (supported: {_SUPPORTED_ROPE_TYPES})"
            )
        if self.theta <= 0 or self.factor <= 0:
            raise ValueError("rope theta and factor must be positive")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder, as stored in a HF `config.json`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        if cfg.get("model_type", "llama") != "llama" or archs[0] not in _SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"only Llama-family checkpoints are supported, got model_type={cfg.get('model_type')!r} "
                f"architectures={archs}"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg.get('hidden_act')!r} is not supported (only silu)")
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope=_rope_from_hf(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        return cls.from_hf_dict(json.loads(config_file.read_text()))


def _rope_from_hf(cfg: dict[str, Any]) -> RopeConfig:
    # transformers < 5 writes `rope_theta` + `rope_scaling`; 5.x writes `rope_parameters`
    # (which carries rope_theta too). Accept both.
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    kwargs: dict[str, Any] = {"theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        kwargs["factor"] = float(params["factor"])
    if rope_type == "llama3":
        kwargs["low_freq_factor"] = float(params["low_freq_factor"])
        kwargs["high_freq_factor"] = float(params["high_freq_factor"])
        kwargs["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    return RopeConfig(**kwargs)


DEFAULT_KV_CACHE_MEMORY_FRACTION = 0.5  # of the device's available memory, when no budget is given


@dataclass(frozen=True)
class EngineConfig:
    """How one engine batches and bounds its sequences (the same whatever executes the forwards)."""

    max_batch_size: int = 16  # most sequences decoded together (KV cache slots, if the memory budget holds them)
    max_context: int | None = None  # tokens per sequence (prompt + new); default: the model's limit
    # Verify in step with the batch: a greedy sequence with proposals waiting at a level someone
    # else verifies this step verifies them too (see align_actions). Output is the same either way.
    align_verification: bool = True
    # Proposals below the target (drafts, intermediate verifications) of greedy sequences come
    # from the exit head over tokens [0, draft_vocab) only (see EarlyExitModel.exit_logits):
    # lossless, since only the target's distribution decides; cheaper when the full head does
    # not fit the cache. None: the full head everywhere. Sampled sequences always use the full head.
    draft_vocab: int | None = None
    # The KV cache's memory budget (hispec.kv.budget.plan_kv_cache): bytes for the KV of every
    # layer (summed over pipeline stages), or a share of the device memory available when the
    # cache is made. At most one; neither: DEFAULT_KV_CACHE_MEMORY_FRACTION. The budget decides
    # how many sequences of `capacity` tokens run at once (at most max_batch_size).
    kv_cache_memory: int | None = None
    kv_cache_memory_fraction: float | None = None
    # Prompt tokens run per step, over every sequence being prefilled: a longer prompt enters over
    # several steps, each also running the decoding forwards of the batch (chunked prefill).
    prefill_chunk_tokens: int = 256
    # Greedy HiSpec / LayerSkip sequences speculate ahead: the first stage drafts and verifies a
    # whole window below the target on its own (one driver round trip per window, not per draft),
    # in a pipeline while the deeper stages check the previous window (hispec.engine.ahead).
    # Output is the same either way; needs the levels below the target on the first stage.
    # None: on for pipelines (the overlap pays for the windows a rejection throws away), off in
    # one process (nothing overlaps there, so those windows are pure loss: measured 0.8x).
    speculate_ahead: bool | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError("max_context must be >= 2")
        if self.prefill_chunk_tokens < 1:
            raise ValueError("prefill_chunk_tokens must be >= 1")
        if self.draft_vocab is not None and self.draft_vocab < 1:
            raise ValueError("draft_vocab must be >= 1 (or None: the full head)")
        if self.kv_cache_memory is not None and self.kv_cache_memory_fraction is not None:
            raise ValueError("give kv_cache_memory or kv_cache_memory_fraction, not both")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError("kv_cache_memory must be >= 1 byte")
        if self.kv_cache_memory_fraction is not None and not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError("kv_cache_memory_fraction must be in (0, 1]")

    def capacity(self, max_position_embeddings: int) -> int:
        """Tokens per sequence: max_context, at most the model's limit."""
        return min(self.max_context or max_position_embeddings, max_position_embeddings)

    def kv_budget(self, available_bytes: int | None) -> int:
        """Bytes the KV cache may take: kv_cache_memory, or the fraction of `available_bytes`
        (the device memory free now; needed only when no absolute budget is set)."""
        if self.kv_cache_memory is not None:
            return self.kv_cache_memory
        if available_bytes is None:
            raise ValueError("a KV budget by fraction needs the device's available memory")
        fraction = self.kv_cache_memory_fraction
        return int((DEFAULT_KV_CACHE_MEMORY_FRACTION if fraction is None else fraction) * available_bytes)
