"""Llama-family early-exit model runtime (no Ray, no gRPC here)."""

from hispec.model.loading import compute_dtype, load_model, resolve_dtype
from hispec.model.model import EarlyExitModel
from hispec.model.step import ForwardStep

__all__ = ["EarlyExitModel", "ForwardStep", "compute_dtype", "load_model", "resolve_dtype"]
