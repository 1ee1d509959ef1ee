"""Build an `EarlyExitModel` (or a part of one) from a local HF checkpoint directory.

The module skeleton is created on the meta device (`accelerate.init_empty_weights`), so no
memory is spent on weights the part does not own; each owned parameter is then read from disk
by name and placed on the target device in the target dtype.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device

from hispec.config import ModelConfig
from hispec.model.checkpoint import CheckpointReader, tensor_map
from hispec.model.model import EarlyExitModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

log = logging.getLogger(__name__)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def compute_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype a model loaded with `dtype` on `device` holds its parameters, activations and KV
    cache in (`EarlyExitModel.dtype`).

    bfloat16 on CPU computes in float32: the weights are rounded to bf16 (a bf16 checkpoint's own
    values) and held widened to fp32, which is exact, so the C++ stack's packed GEMMs keep them as
    bf16 panels (half the bytes streamed) and every product and sum is fp32. bf16 parameters ran
    ATen's bf16 ops instead, 2.8-4.6x slower per token (docs/runtime.md, "bfloat16 on CPU"). The
    KV cache is fp32 too: the packed kernels read and write fp32 K/V. Other devices and dtypes
    compute in `dtype`."""
    dtype = resolve_dtype(dtype)
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu":
        return torch.float32
    return dtype


def load_model(
    path: str | Path,
    *,
    layer_range: tuple[int, int] | None = None,
    with_embeddings: bool = True,
    with_head: bool = True,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    native: bool = True,
) -> EarlyExitModel:
    """Load layers `layer_range` (default: all) and, when asked, the embeddings and exit head.

    `native`: run the layer loop in C++ when the extension can be built (same results; see
    `EarlyExitModel.use_native_layers`).

    `dtype`: the weights' precision. The model computes in `compute_dtype(dtype, device)`:
    bfloat16 on CPU means bf16 weights with fp32 activations, accumulation and KV cache.

    The returned model's `loaded_tensor_names` is the set of checkpoint tensors read;
    `weights_dtype` is `dtype` (the precision the weights were rounded to).
    """
    config = ModelConfig.from_pretrained(path)
    weights_dtype = resolve_dtype(dtype)
    dtype = compute_dtype(weights_dtype, device)
    rounds = weights_dtype != dtype  # bf16 weights held in fp32: round first, then widen (exact)
    with init_empty_weights(include_buffers=False):
        model = EarlyExitModel(config, layer_range, with_embeddings=with_embeddings, with_head=with_head)
    reader = CheckpointReader(path)
    mapping = tensor_map(config, range(*model.layer_range), embeddings=with_embeddings, head=with_head)
    tied_head = config.tie_word_embeddings and with_embeddings and with_head
    try:
        for name, hf_names in mapping.items():
            if name == "lm_head.weight" and tied_head:
                continue  # shares the embedding Parameter, set below
            value = torch.cat([reader.get(n) for n in hf_names], dim=0) if len(hf_names) > 1 else reader.get(hf_names[0])
            if rounds:
                value = value.to(weights_dtype)
            set_module_tensor_to_device(model, name, device, value=value, dtype=dtype)
    finally:
        reader.close()
    if tied_head:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = model.inv_freq.to(device)
    model.loaded_tensor_names = frozenset(reader.names_read)
    model.weights_dtype = weights_dtype
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise RuntimeError(f"parameters left unloaded: {meta}")
    if torch.device(device).type == "cpu" and dtype == torch.float32:
        model.store_projections_input_major()  # faster CPU GEMMs; see the method
    model.eval().requires_grad_(False)
    on = model.use_native_layers(native)
    if rounds:
        log.info("%s on %s: %s weights, computed in %s (%s); see hispec.model.loading.compute_dtype",
                 weights_dtype, device, weights_dtype, dtype, "C++ stack" if on else "Python layer loop")
    return model
