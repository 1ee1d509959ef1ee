"""The application's arguments (the `args:` block of deploy/hispec.yaml), validated once."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hispec.models import DEFAULT_MODEL


class AppArgs(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Path = Field(DEFAULT_MODEL, description="checkpoint directory (config.json, *.safetensors, tokenizer); "
                        "default: the bundled model")
    model_name: str | None = Field(None, description="the name clients use (OpenAI `model`); default: the "
                                   "checkpoint directory's name")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights and activations")
    device: str = Field("auto", description="'auto' (cuda when the replica has a GPU, else cpu), 'cpu' or 'cuda'")
    method: Literal["auto", "ar", "layerskip", "hispec"] = Field(
        "auto", description="decoding method; auto: the tuned hierarchy for the current batch size "
        "(hispec_config.json next to the checkpoint)")
    exits: tuple[int, ...] | None = Field(None, description="explicit exit layers (layerskip / hispec only)")
    budgets: tuple[int, ...] | None = Field(None, description="explicit per-level budgets, one per exit")
    max_batch_size: int = Field(16, ge=1, le=1024, description="sequences one engine replica decodes at once "
                                "(KV slots); more requests wait in the engine's queue")
    max_context: int | None = Field(None, ge=2, description="prompt + new tokens; default and upper bound: the "
                                    "model's max_position_embeddings")
    default_max_new_tokens: int = Field(128, ge=1, description="gRPC requests that leave max_new_tokens unset "
                                        "(the OpenAI API's own default, 16, applies over HTTP)")
    max_prompt_chars: int = Field(100_000, ge=1, description="longer prompts are refused before tokenizing")
    max_stop_strings: int = Field(16, ge=0, description="stop strings one request may give")
    stream_interval_s: float = Field(0.02, ge=0, le=1, description="a stream's committed tokens leave the engine "
                                     "replica at most this often (its first and last tokens at once): fewer, "
                                     "larger messages leave more CPU to the model; 0 sends every step's tokens")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads of the engine replica "
                                      "(default: the replica's CPUs, at least 1)")

    @field_validator("model")
    @classmethod
    def _checkpoint_exists(cls, model: Path) -> Path:
        model = model.expanduser().resolve()
        if not (model / "config.json").is_file():
            raise ValueError(f"no checkpoint at {model} (config.json missing)")
        return model

    @model_validator(mode="after")
    def _hierarchy_shape(self) -> "AppArgs":
        if (self.exits or self.budgets) and self.method in ("auto", "ar"):
            raise ValueError(f"method {self.method} takes no exits/budgets")
        return self

    @property
    def served_name(self) -> str:
        return self.model_name or self.model.name
