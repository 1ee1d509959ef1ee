"""The model split by depth into stage actors on Ray, driven over torch.distributed (gloo / NCCL)."""

from hispec.pipeline.pipeline import (
    Pipeline, PipelineConnection, PipelineError, PipelineExecutor, PipelineSpec, exits_of, stage_timing_report,
)
from hispec.pipeline.split import stage_bounds

__all__ = ["Pipeline", "PipelineConnection", "PipelineError", "PipelineExecutor", "PipelineSpec", "exits_of",
           "stage_bounds", "stage_timing_report"]
