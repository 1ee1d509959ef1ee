"""A pipeline: S stage actors in one placement group (the Ray side), and the driver's executor
that talks to them over the transport (any process; no Ray call per step).

    pipeline = Pipeline.create(PipelineSpec(model_path, bounds=(0, 6, 16), num_slots=16, capacity=512))
    pipeline.connection.kv_layout              # what the KV budget holds: num_slots <= 16 sequences
    executor = PipelineExecutor(pipeline.connection)      # rank 0: this process drives
    engine = SpecEngine(executor, policy, config)
    ...
    executor.close(); pipeline.shutdown()

The two halves are apart so that in serving the replica (a Ray actor) owns the placement group and
the stage actors, while the engine loop drives them from a process of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hispec.config import EngineConfig, ModelConfig
from hispec.engine.executor import ExecutorFailure
from hispec.engine.plan import KVSnapshot, StepPlan, StepResult
from hispec.engine.stage import takes_part
from hispec.engine.transport import GroupAddress, Transport
from hispec.kv.budget import KVLayout, pipeline_available_bytes, plan_kv_cache
from hispec.model.loading import compute_dtype
from hispec.pipeline.messages import (
    Shutdown, SnapshotRequest, StageFailure, StageTimes, StatsRequest, TimelineRequest,
)
from hispec.pipeline.timeline import BUSY, DEFAULT_CAPACITY, IDLE, TRANSPORT, IntervalRing, Lane
from hispec.speculation.hierarchy import Hierarchy

log = logging.getLogger(__name__)


class PipelineError(ExecutorFailure):
    """A stage failed or became unreachable: the pipeline cannot run any more steps."""


@dataclass(frozen=True)
class PipelineSpec:
    model_path: Path
    bounds: tuple[int, ...]  # layer bounds (0, b_1, ..., L): stage s runs [bounds[s], bounds[s + 1])
    num_slots: int  # most sequences (max_batch_size): the KV budget may hold fewer (see Pipeline.create)
    capacity: int  # tokens per sequence
    exits: tuple[int, ...] = ()  # every exit any hierarchy reads: the stages owning one load the head
    dtype: str = "float32"
    device: str = "cpu"  # "cuda": one GPU per stage, hidden rows over NCCL
    cpus_per_stage: float = 0.5  # bundle size on CPU (fractional: two stages share the 2-core box)
    threads_per_stage: int = 1
    ready_timeout_s: float = 180.0
    # The KV budget of all stages together (EngineConfig's fields of the same names): bytes, or a
    # share of the memory the stages' devices have available once their weights are loaded.
    kv_cache_memory: int | None = None
    kv_cache_memory_fraction: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_path", Path(self.model_path))
        b = tuple(int(x) for x in self.bounds)
        object.__setattr__(self, "bounds", b)
        if len(b) < 2 or b[0] != 0 or any(x >= y for x, y in zip(b, b[1:])):
            raise ValueError(f"stage bounds must rise from 0 to the model's depth, got {b}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.num_slots < 1 or self.capacity < 2:
            raise ValueError("num_slots must be >= 1 and capacity >= 2")
        self.kv_config()  # the budget fields are checked there

    def kv_config(self) -> EngineConfig:
        """The fields the KV planner reads, as an EngineConfig."""
        return EngineConfig(max_batch_size=self.num_slots, max_context=self.capacity,
                            kv_cache_memory=self.kv_cache_memory, kv_cache_memory_fraction=self.kv_cache_memory_fraction)

    @property
    def num_stages(self) -> int:
        return len(self.bounds) - 1

    @property
    def data_backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"

    def stage_ranges(self) -> list[tuple[int, int]]:
        return list(zip(self.bounds, self.bounds[1:]))

    def needs_head(self, stage: int) -> bool:
        lo, hi = self.stage_ranges()[stage]
        return stage == self.num_stages - 1 or any(lo < e <= hi for e in self.exits)

    def bundles(self) -> list[dict[str, float]]:
        if self.device == "cuda":
            return [{"CPU": 1, "GPU": 1} for _ in range(self.num_stages)]
        return [{"CPU": self.cpus_per_stage} for _ in range(self.num_stages)]


def exits_of(hierarchies: Iterable[Hierarchy]) -> tuple[int, ...]:
    return tuple(sorted({e for h in hierarchies for e in h.exits}))


@dataclass(frozen=True)
class PipelineConnection:
    """Everything the driver needs to join a running pipeline (picklable)."""

    address: GroupAddress
    model_config: ModelConfig
    stage_ranges: tuple[tuple[int, int], ...]
    num_slots: int  # sequences every stage's KV cache holds (planned from the budget)
    capacity: int
    kv_layout: KVLayout | None = None  # the plan, with the bytes all stages allocated


@dataclass
class Pipeline:
    """The Ray side: a placement group with one bundle per stage, the stage actors, their loops."""

    spec: PipelineSpec
    actors: list
    loops: list  # ObjectRefs of the stage loops (they finish on Shutdown or failure)
    connection: PipelineConnection
    placement_group: object = None
    owns_placement_group: bool = True
    _dead: str | None = field(default=None, repr=False)

    @classmethod
    def create(cls, spec: PipelineSpec, placement_group=None, first_bundle: int = 0) -> "Pipeline":
        """Reserve the bundles (or use `placement_group`'s bundles first_bundle..first_bundle+S-1,
        e.g. a Serve replica's own group), start the stage actors and their loops."""
        import ray
        from ray.util.placement_group import placement_group as make_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from hispec.pipeline.stage_actor import StageActor, StageSpec

        owns = placement_group is None
        if owns:
            placement_group = make_group(spec.bundles(), strategy="PACK")
            ready, _ = ray.wait([placement_group.ready()], timeout=spec.ready_timeout_s)
            if not ready:
                ray.util.remove_placement_group(placement_group)
                raise TimeoutError(f"no room for the pipeline's bundles {spec.bundles()} after {spec.ready_timeout_s:.0f} s")
        actors, bundles = [], spec.bundles()
        try:
            for s, (lo, hi) in enumerate(spec.stage_ranges()):
                stage = StageSpec(s, spec.model_path, (lo, hi), with_embeddings=lo == 0, with_head=spec.needs_head(s),
                                  dtype=spec.dtype, device=spec.device, threads=spec.threads_per_stage)
                actors.append(StageActor.options(
                    num_cpus=bundles[s]["CPU"], num_gpus=bundles[s].get("GPU", 0),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group, first_bundle + s),
                ).remote(stage))
            ray.get([a.ping.remote() for a in actors], timeout=spec.ready_timeout_s)  # loaded
            layout = _plan_stage_caches(spec, actors)
            address = ray.get(actors[0].host_store.remote(spec.num_stages + 1, spec.data_backend))
            loops = [a.serve.remote(address) for a in actors]
        except BaseException:
            for actor in actors:
                ray.kill(actor)
            if owns:
                ray.util.remove_placement_group(placement_group)
            raise
        connection = PipelineConnection(address, ModelConfig.from_pretrained(spec.model_path),
                                        tuple(spec.stage_ranges()), layout.num_slots, layout.capacity, layout)
        log.info("pipeline of %d stages %s at %s:%d; %s", spec.num_stages, spec.stage_ranges(), address.host,
                 address.port, layout.describe())
        return cls(spec, actors, loops, connection, placement_group, owns)

    def failure(self) -> str | None:
        """Why the pipeline stopped (a stage loop ended or its actor died), or None while it runs."""
        import ray

        if self._dead is None:
            done, _ = ray.wait(self.loops, num_returns=1, timeout=0)
            if done:
                try:
                    outcome = ray.get(done[0])
                    self._dead = f"stage {self.loops.index(done[0])} loop ended: {outcome}"
                except Exception as error:  # noqa: BLE001 - the actor died or its loop raised
                    self._dead = f"stage {self.loops.index(done[0])} failed: {type(error).__name__}: {error}"
        return self._dead

    def describe(self) -> list[dict]:
        import ray

        return ray.get([a.describe.remote() for a in self.actors])

    def shutdown(self) -> None:
        """Kill the stage actors and release the placement group (if this pipeline made it)."""
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self.owns_placement_group and self.placement_group is not None:
            try:
                ray.util.remove_placement_group(self.placement_group)
            except Exception:  # noqa: BLE001
                pass
        self.actors, self.loops = [], []


class PipelineExecutor:
    """The driver's end (rank 0): sends each plan to the stages taking part in it, gathers head
    outputs and errors.

    Per step: one pickled plan to each stage taking part, hidden rows stage to stage, one reply from
    each of those stages."""

    def __init__(self, connection: PipelineConnection) -> None:
        self.connection = connection
        self.model_config = connection.model_config
        self.num_slots, self.capacity = connection.num_slots, connection.capacity
        self.kv_layout = connection.kv_layout
        self.stage_ranges = connection.stage_ranges
        self.first_stage_layers = self.stage_ranges[0][1]  # where speculation ahead can run
        self._ranks = list(range(1, len(connection.stage_ranges) + 1))
        self.transport = Transport(connection.address, 0)
        self._broken: str | None = None
        # Per rank: the KV truncations and releases of the plans it was left out of, not yet delivered
        self._pending: dict[int, list[StepPlan]] = {rank: [] for rank in self._ranks}
        self.plan_bytes = 0  # control bytes sent (plans), for reports
        self.steps = 0
        self._timeline: IntervalRing | None = None  # the driver's own intervals while recording

    def execute(self, plan: StepPlan) -> StepResult:
        """Only the stages with work in `plan` get it (a HiSpec step that drafts or verifies below
        e_v leaves the deep stages out: one control round trip less); the others keep its KV
        truncations and releases until they next take part. They cannot miss one they need: a
        truncation of deep layers comes from a verification that ran there, and a slot is reused
        only after a prefill, which runs through every stage."""
        messages = {}
        for rank in self._ranks:
            pending = self._pending[rank]
            if takes_part(self.stage_ranges[rank - 1], plan) or not (plan.forwards or plan.aheads):
                messages[rank] = _after(pending, plan) if pending else plan
                self._pending[rank] = []
            elif plan.truncations or plan.releases:
                pending.append(StepPlan(plan.truncations, plan.releases))
        result: StepResult = [{} for _ in range(len(plan.forwards) + len(plan.aheads))]
        for reply in self._round_trip(messages):
            for i, heads in reply.items():
                result[i].update(heads)
        self.steps += 1
        return result

    def snapshot(self, with_tensors: bool = False) -> list[KVSnapshot]:
        self.execute(StepPlan())  # deliver what stages left out of recent steps still hold
        return self._round_trip(dict.fromkeys(self._ranks, SnapshotRequest(with_tensors)))

    def stage_times(self, reset: bool = False) -> list[StageTimes]:
        """Each stage loop's busy / transport / idle seconds and bytes since the last reset."""
        return self._round_trip(dict.fromkeys(self._ranks, StatsRequest(reset)))

    def start_timeline(self, capacity: int = DEFAULT_CAPACITY) -> None:
        """Every stage loop and this driver start recording their intervals into fresh rings of
        `capacity` (one round trip now; nothing per step but the marks)."""
        self._round_trip(dict.fromkeys(self._ranks, TimelineRequest(take=False, capacity=capacity)))
        self._timeline = IntervalRing(capacity)

    def take_timeline(self) -> list[Lane]:
        """Stop recording; the lanes: stage 0, ..., stage S-1, then the driver (see
        hispec.pipeline.timeline for what each kind of interval means on each)."""
        ring, self._timeline = self._timeline, None
        if ring is None:
            raise RuntimeError("take_timeline without start_timeline")
        return self._round_trip(dict.fromkeys(self._ranks, TimelineRequest(take=True))) + [ring.lane("driver")]

    def _round_trip(self, messages: dict) -> list:
        """Send each rank its message (identical messages pickled once), then read their replies in rank order.
        While recording: the driver's Python since the last replies is busy, sending is transport,
        waiting for the replies is idle."""
        if self._broken is not None:
            raise PipelineError(f"the pipeline is down: {self._broken}")
        timeline = self._timeline
        if timeline is not None:
            timeline.mark(BUSY)
        rank = None  # the rank being read from, for the error message
        try:
            by_message: dict[int, list[int]] = {}
            for r, message in messages.items():
                by_message.setdefault(id(message), []).append(r)
            for ranks in by_message.values():
                self.plan_bytes += self.transport.send_object(messages[ranks[0]], *ranks) * len(ranks)
            if timeline is not None:
                timeline.mark(TRANSPORT)
            replies = []
            for rank in messages:
                reply = self.transport.recv_object(rank)
                if isinstance(reply, StageFailure):
                    lo, hi = reply.layer_range
                    log.error("stage %d (layers [%d, %d)) failed:\n%s", reply.stage, lo, hi, reply.traceback)
                    raise PipelineError(f"stage {reply.stage} (layers [{lo}, {hi})) failed: {reply.error}")
                replies.append(reply)
            if timeline is not None:
                timeline.mark(IDLE)
            return replies
        except PipelineError as error:
            self._broken = str(error)
            raise
        except Exception as error:  # a closed connection: a stage process died
            where = f"stage {rank - 1}" if rank else "a stage"
            self._broken = f"{where} is unreachable ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
            raise PipelineError(f"the pipeline is down: {self._broken}") from error

    def close(self) -> None:
        """Stop the stage loops (they return) and leave the groups."""
        if self._broken is None:
            try:
                self.transport.send_object(Shutdown(), *self._ranks)
            except Exception:  # noqa: BLE001 - a stage already gone
                pass
            self._broken = "closed"
        time.sleep(0.05)  # let the loops read Shutdown before the sockets close
        self.transport.close()


def _plan_stage_caches(spec: PipelineSpec, actors: list) -> KVLayout:
    """Plan the KV layout of the whole pipeline from its budget and have every stage allocate its
    layers' part. A budget by fraction is of the memory each stage's device has available with
    the weights loaded; stages on one memory pool (CPU stages of one node) share it."""
    import ray

    config = spec.kv_config()
    model_config = ModelConfig.from_pretrained(spec.model_path)
    available = None
    if config.kv_cache_memory is None:
        pools = ray.get([a.memory_pool.remote() for a in actors], timeout=spec.ready_timeout_s)
        available = pipeline_available_bytes(spec.stage_ranges(), [free for _, free in pools], [pool for pool, _ in pools])
    layout = plan_kv_cache(model_config, config, compute_dtype(spec.dtype, spec.device), available)
    allocated = ray.get([a.allocate_cache.remote(layout.num_slots, layout.capacity) for a in actors],
                        timeout=spec.ready_timeout_s)
    return KVLayout(layout.num_slots, layout.capacity, layout.bytes_per_token, sum(allocated), layout.budget_bytes)


def _after(pending: list[StepPlan], plan: StepPlan) -> StepPlan:
    """`plan`, carrying first the cache operations of the plans a stage was left out of (in order)."""
    return StepPlan(tuple(t for p in pending for t in p.truncations) + plan.truncations,
                    tuple(s for p in pending for s in p.releases) + plan.releases, plan.forwards, plan.aheads)


def stage_timing_report(times: Sequence[StageTimes], wall_seconds: float) -> list[dict]:
    """Per stage: busy / transport / idle seconds and their share of `wall_seconds`, bytes moved."""
    out = []
    for s, t in enumerate(times):
        out.append({"stage": s, "steps": t.steps, "busy_s": round(t.busy, 4), "transport_s": round(t.transport, 4),
                    "idle_s": round(t.idle, 4), "busy_share": round(t.busy / wall_seconds, 4) if wall_seconds else None,
                    "transport_share": round(t.transport / wall_seconds, 4) if wall_seconds else None,
                    "idle_share": round(t.idle / wall_seconds, 4) if wall_seconds else None,
                    "bytes_sent": t.bytes_sent, "bytes_received": t.bytes_received})
    return out
