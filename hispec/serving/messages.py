"""What the engine deployment hands the ingress (plain data: it crosses Ray calls)."""

from __future__ import annotations

from dataclasses import dataclass

from hispec.serving.params import Limits


@dataclass(frozen=True)
class Chunk:
    """Tokens committed since the previous chunk; the last chunk has `finish_reason` and `stats`."""

    token_ids: list[int]
    text: str
    finish_reason: str = ""  # "stop", "length", "context" on the last chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0  # so far
    stats: dict | None = None  # RequestStats.to_dict(hierarchy), last chunk only


@dataclass(frozen=True)
class EngineInfo:
    model: str
    num_layers: int
    vocab_size: int
    max_batch_size: int
    hierarchies: list[str]
    limits: Limits
