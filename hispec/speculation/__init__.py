"""Hierarchical speculative decoding on an early-exit model (no Ray, no gRPC here)."""

from hispec.speculation.engine import EngineConfig, SpecEngine
from hispec.speculation.hierarchy import BatchPolicy, Hierarchy, load_policy, paper_default, resolve_hierarchy, resolve_policy
from hispec.speculation.rejection import RejectionSampler, Verdict
from hispec.speculation.request import GenerationResult, Request, StepOutput
from hispec.speculation.sampling import SamplingParams
from hispec.speculation.stats import RequestStats

__all__ = [
    "BatchPolicy", "EngineConfig", "GenerationResult", "Hierarchy", "RejectionSampler", "Request", "RequestStats",
    "SamplingParams", "SpecEngine", "StepOutput", "Verdict", "load_policy", "paper_default", "resolve_hierarchy",
    "resolve_policy",
]
