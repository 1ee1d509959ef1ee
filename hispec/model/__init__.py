"""Llama-family early-exit model runtime (no Ray, no gRPC here)."""

from hispec.model.loading import load_model, resolve_dtype
from hispec.model.model import EarlyExitModel
from hispec.model.step import ForwardStep

__all__ = ["EarlyExitModel", "ForwardStep", "load_model", "resolve_dtype"]
