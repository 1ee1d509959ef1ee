"""Hierarchical speculation, pure: hierarchies, sequence state, sampling, rejection sampling,
decisions, statistics and text (no Ray, no gRPC, no model here)."""

from hispec.speculation.hierarchy import BatchPolicy, Hierarchy, load_policy, paper_default, resolve_hierarchy, resolve_policy
from hispec.speculation.rejection import RejectionSampler, Verdict
from hispec.speculation.request import GenerationResult, Request, StepOutput
from hispec.speculation.sampling import SamplingParams
from hispec.speculation.stats import RequestStats

__all__ = [
    "BatchPolicy", "GenerationResult", "Hierarchy", "RejectionSampler", "Request", "RequestStats",
    "SamplingParams", "StepOutput", "Verdict", "load_policy", "paper_default", "resolve_hierarchy",
    "resolve_policy",
]
