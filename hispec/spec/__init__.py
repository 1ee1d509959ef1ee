"""Hierarchical speculative decoding on an early-exit model (no Ray, no gRPC here)."""

from hispec.spec.engine import EngineConfig, SpecEngine
from hispec.spec.hierarchy import BatchPolicy, Hierarchy, load_policy, paper_default, resolve_hierarchy, resolve_policy
from hispec.spec.rejection import RejectionSampler, Verdict
from hispec.spec.request import GenerationResult, Request, StepOutput
from hispec.spec.sampling import SamplingParams
from hispec.spec.stats import RequestStats

__all__ = [
    "BatchPolicy", "EngineConfig", "GenerationResult", "Hierarchy", "RejectionSampler", "Request", "RequestStats",
    "SamplingParams", "SpecEngine", "StepOutput", "Verdict", "load_policy", "paper_default", "resolve_hierarchy",
    "resolve_policy",
]
