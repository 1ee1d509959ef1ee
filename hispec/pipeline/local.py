"""A Ray instance of a command's own (`hispec generate / bench --pipeline-stages`, `hispec
bench-transport`): started in this process for the command, shut down when it ends.

    with local_ray(cpus=stage_cpus(2)):
        with PipelinedEngine.start(model_path, policy, 2, config) as pipelined:
            pipelined.engine.generate(requests)
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager

from hispec.pipeline.pipeline import PipelineSpec


def stage_cpus(num_stages: int, pipelines: int = 1) -> float:
    """Logical CPUs the stage bundles of `pipelines` CPU pipelines of `num_stages` stages reserve."""
    return num_stages * pipelines * PipelineSpec.cpus_per_stage


@contextmanager
def local_ray(cpus: float = 0.0):
    """ray.init(address="local") with this machine's cores as its CPUs (more if `cpus` needs more:
    Ray's CPUs are reservations; pipelines that take turns may share cores), quiet, no dashboard.
    A process already connected to Ray (a test session, a notebook) keeps its connection."""
    import ray

    if ray.is_initialized():
        yield
        return
    num_cpus = max(os.cpu_count() or 1, math.ceil(cpus))
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()
