"""Build the serving engine from the app's arguments (runs in the engine process)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from hispec.model import load_model
from hispec.serving.config import AppArgs
from hispec.engine import EngineConfig, SpecEngine
from hispec.speculation import resolve_policy

log = logging.getLogger(__name__)


def detokenizer(tokenizer) -> Callable[[Sequence[int]], str]:
    """Token ids -> text, the one way both processes decode: the engine finds stop strings in
    it and the replica cuts the streamed text with it, so they must agree."""
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def build_engine(args: AppArgs) -> SpecEngine:
    """The model, its tuned (or requested) decoding policy and a tokenizer for stop strings."""
    from transformers import AutoTokenizer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    # Ray sets OMP_NUM_THREADS to the replica's num_cpus (the child inherits it); torch_threads overrides it.
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = load_model(args.model, dtype=args.dtype, device=device)
    policy = resolve_policy(args.method, model.config.num_layers, args.model, args.exits, args.budgets)
    engine = SpecEngine(model, policy, EngineConfig(args.max_batch_size, args.max_context),
                        detokenize=detokenizer(tokenizer))
    log.info("engine built on %s with %d torch threads, %s layer loop", device, torch.get_num_threads(),
             "C++" if model.native_layers else "Python")
    return engine
