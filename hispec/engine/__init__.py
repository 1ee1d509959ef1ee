"""The engine: a pure scheduler, executors that run its plans (local, or a pipeline of stages),
and `SpecEngine`, which puts them together."""

from hispec.config import EngineConfig
from hispec.engine.engine import SpecEngine
from hispec.engine.executor import Executor, ExecutorFailure, LocalExecutor
from hispec.engine.scheduler import ForwardShape, Scheduler

__all__ = ["EngineConfig", "Executor", "ExecutorFailure", "ForwardShape", "LocalExecutor", "Scheduler", "SpecEngine"]
