"""Build the serving engine from the app's arguments (runs in the engine process)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from hispec.model import load_model
from hispec.serving.config import AppArgs
from hispec.engine import SpecEngine

if TYPE_CHECKING:
    from hispec.pipeline import PipelineConnection, PipelineSpec

log = logging.getLogger(__name__)


def detokenizer(tokenizer) -> Callable[[Sequence[int]], str]:
    """Token ids -> text, the one way both processes decode: the engine finds stop strings in
    it and the replica cuts the streamed text with it, so they must agree."""
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def build_engine(args: AppArgs, connection: "PipelineConnection | None" = None) -> SpecEngine:
    """The model, its tuned (or requested) decoding policy and a tokenizer for stop strings.
    With a `connection`, the engine drives that pipeline's stage actors instead of holding the model."""
    from transformers import AutoTokenizer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    # Ray sets OMP_NUM_THREADS to the replica's num_cpus (the child inherits it); torch_threads overrides it.
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)  # never run code from a checkpoint
    policy, engine_config = args.policy(), args.engine_config()
    if connection is not None:
        from hispec.pipeline import PipelineExecutor

        engine = SpecEngine(PipelineExecutor(connection), policy, engine_config, detokenize=detokenizer(tokenizer))
        log.info("engine driving a pipeline of %d stages %s", len(connection.stage_ranges), connection.stage_ranges)
        return engine
    model = load_model(args.model, dtype=args.dtype, device=device)
    engine = SpecEngine(model, policy, engine_config, detokenize=detokenizer(tokenizer))
    log.info("engine built on %s with %d torch threads, %s layer loop", device, torch.get_num_threads(),
             "C++" if model.native_layers else "Python")
    return engine


def pipeline_spec_for(args: AppArgs) -> "PipelineSpec":
    """The pipeline a replica reserves for `args` (stage split measured on this machine)."""
    from hispec.pipeline.build import pipeline_spec

    device = "cuda" if args.device == "cuda" or (args.device == "auto" and args.stage_gpus) else "cpu"
    return pipeline_spec(args.model, args.policy(), args.pipeline_stages, args.max_batch_size,
                         args.engine_config().capacity(args.checkpoint_config().max_position_embeddings),
                         dtype=args.dtype, device=device, cpus_per_stage=args.stage_cpus,
                         threads_per_stage=args.stage_threads, kv_cache_memory=args.kv_cache_memory,
                         kv_cache_memory_fraction=args.kv_cache_memory_fraction)
