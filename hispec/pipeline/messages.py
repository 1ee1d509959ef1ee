"""Control messages of the stage loop besides `StepPlan` (pickled over the control group)."""

from __future__ import annotations

from dataclasses import dataclass

from hispec.pipeline.timeline import DEFAULT_CAPACITY


@dataclass(frozen=True)
class SnapshotRequest:
    with_tensors: bool = False


@dataclass(frozen=True)
class StatsRequest:
    """Ask a stage for its loop's timing counters (busy / transport / idle seconds, bytes)."""

    reset: bool = False


@dataclass(frozen=True)
class TimelineRequest:
    """Start recording the stage loop's intervals into a fresh ring of `capacity` (the reply: None),
    or stop and take what it recorded (the reply: a `timeline.Lane`). Sent between runs, never per step."""

    take: bool = False
    capacity: int = DEFAULT_CAPACITY


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class StageFailure:
    """A stage's answer when running a message raised: the driver raises it as a PipelineError."""

    stage: int
    layer_range: tuple[int, int]
    error: str  # the exception, one line
    traceback: str = ""  # where it was raised (logged by the driver, not sent to clients)


@dataclass
class StageTimes:
    """Where a stage's loop spent its time since the last reset (seconds), and what it moved."""

    busy: float = 0.0  # running layers and heads
    transport: float = 0.0  # sending and receiving hidden rows and replies
    idle: float = 0.0  # waiting for the next plan from the driver
    steps: int = 0
    bytes_sent: int = 0  # hidden rows to the next stage
    bytes_received: int = 0
