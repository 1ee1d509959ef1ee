"""The application's arguments (the `args:` block of deploy/hispec.yaml), validated once."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hispec.models import DEFAULT_MODEL

if TYPE_CHECKING:
    from hispec.config import EngineConfig, ModelConfig
    from hispec.speculation import BatchPolicy


class AppArgs(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Path = Field(DEFAULT_MODEL, description="checkpoint directory (config.json, *.safetensors, tokenizer); "
                        "default: the bundled model")
    model_name: str | None = Field(None, description="the name clients use (OpenAI `model`); default: the "
                                   "checkpoint directory's name")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights (and activations on "
                                                             "GPUs); bfloat16 on CPU computes in float32 over "
                                                             "bf16 weights (docs/runtime.md)")
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

    # ---- memory and load -------------------------------------------------------------------
    kv_cache_memory: int | None = Field(None, ge=1, description="bytes for the KV cache of all layers (summed over "
                                        "pipeline stages); it decides how many sequences run at once (at most "
                                        "max_batch_size). Default: kv_cache_memory_fraction of the free memory")
    kv_cache_memory_fraction: float | None = Field(None, gt=0, le=0.95, description="share of the device's "
                                                   "available memory the KV cache may take (default 0.5 when "
                                                   "kv_cache_memory is not set either)")
    prefill_chunk_tokens: int = Field(256, ge=1, description="prompt tokens prefilled per engine step (at the "
                                      "start of a prompt; later chunks are smaller, as their tokens attend to more "
                                      "of the prompt): a long prompt enters in chunks between decoding steps, so "
                                      "running streams keep their pace. On CPU, keep a chunk's work near a decoding "
                                      "step's (deploy/hispec.yaml: 16)")
    max_queued_requests: int = Field(64, ge=0, description="requests one engine replica holds beyond its running "
                                     "sequences; more are refused at once (gRPC RESOURCE_EXHAUSTED, HTTP 429)")
    max_prompts_per_request: int = Field(16, ge=1, le=1024, description="prompts one /v1/completions request may "
                                         "carry (one choice each)")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="largest HTTP request body accepted (HTTP 413 "
                                   "beyond); gRPC messages are bounded by the proxy (RAY_SERVE_GRPC_MAX_MESSAGE_SIZE)")
    api_key_env: str | None = Field("HISPEC_API_KEY", description="environment variable holding the API key: when "
                                    "it is set and not empty, every route and RPC needs it (HTTP `Authorization: "
                                    "Bearer KEY`, gRPC metadata `authorization: Bearer KEY`); the key itself never "
                                    "sits in a config file")

    pipeline_stages: int = Field(1, ge=1, le=64, description="split the model by depth into this many stage "
                                 "actors (stage 0: embeddings + layers up to the deepest exit; the rest by measured "
                                 "cost); 1: one engine process holds the whole model")
    stage_cpus: float = Field(0.5, gt=0, le=64, description="CPUs reserved per stage actor on CPU machines "
                              "(fractional: stages share cores)")
    stage_threads: int = Field(1, ge=1, le=256, description="torch / OpenMP threads of each stage actor")
    stage_gpus: bool = Field(False, description="one GPU per stage (hidden rows over NCCL); needs device cuda or auto")
    replica_cpus: float = Field(0.5, gt=0, le=64, description="with pipeline_stages > 1: CPUs of the engine replica "
                                "(bundle 0 of its placement group; it runs the scheduler and drives the stages)")
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD"] = Field(
        "PACK", description="with pipeline_stages > 1: how Ray places a pipeline's bundles (the replica's, then one per "
        "stage). PACK: on as few nodes as possible, split across nodes when no single one has room; STRICT_PACK: all "
        "on one node or not at all (stage-to-stage traffic never leaves the node, and the autoscaler adds a node big "
        "enough for a whole pipeline); SPREAD: across nodes where it can")

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
        if self.pipeline_stages > 1:
            from hispec.pipeline.build import check_num_stages

            try:
                check_num_stages(self.policy(), self.pipeline_stages)
            except ValueError as error:
                raise ValueError(f"pipeline_stages: {error}") from None
        if self.stage_gpus and self.device == "cpu":
            raise ValueError("stage_gpus needs device cuda or auto")
        if self.kv_cache_memory is not None and self.kv_cache_memory_fraction is not None:
            raise ValueError("give kv_cache_memory or kv_cache_memory_fraction, not both")
        if self.pipeline_stages == 1 and self.placement_strategy != "PACK":
            raise ValueError(f"placement_strategy {self.placement_strategy} applies to pipelines: it needs "
                             "pipeline_stages > 1 (a single-process engine reserves no placement group)")
        return self

    def checkpoint_config(self) -> "ModelConfig":
        """The checkpoint's architecture (its config.json)."""
        from hispec.config import ModelConfig

        return ModelConfig.from_pretrained(self.model)

    def policy(self) -> "BatchPolicy":
        """The decoding policy these args ask for (tuned or explicit hierarchies, see resolve_policy)."""
        from hispec.speculation import resolve_policy

        return resolve_policy(self.method, self.checkpoint_config().num_layers, self.model, self.exits, self.budgets)

    def engine_config(self) -> "EngineConfig":
        from hispec.config import EngineConfig

        return EngineConfig(self.max_batch_size, self.max_context, kv_cache_memory=self.kv_cache_memory,
                            kv_cache_memory_fraction=self.kv_cache_memory_fraction,
                            prefill_chunk_tokens=self.prefill_chunk_tokens)

    def placement_bundles(self) -> list[dict[str, float]] | None:
        """The engine replica's placement group: bundle 0 for the replica (CPU only: its stage actors
        hold the GPUs), one bundle per stage. None for a single-process engine."""
        if self.pipeline_stages == 1:
            return None
        stage = {"CPU": 1.0, "GPU": 1.0} if self.stage_gpus else {"CPU": self.stage_cpus}
        return [{"CPU": self.replica_cpus}] + [dict(stage) for _ in range(self.pipeline_stages)]

    def api_key(self) -> str | None:
        """The key clients must present, read from the environment of the process asking (None: open)."""
        import os

        return (os.environ.get(self.api_key_env) or None) if self.api_key_env else None

    @property
    def served_name(self) -> str:
        return self.model_name or self.model.name
