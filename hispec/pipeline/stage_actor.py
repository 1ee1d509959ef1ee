"""A pipeline stage as a Ray actor: loads only its layers, owns only their KV cache, and runs a
persistent loop that takes plans from the driver over the transport (no Ray call per step).

    actor = StageActor.options(placement_group=..., num_cpus=0.5).remote(spec)
    address = ray.get(first_stage.host_store.remote(world_size, data_backend))  # stage 0 only
    loop = actor.serve.remote(address)            # returns when the driver sends Shutdown

While the driver has it record (`PipelineExecutor.start_timeline` / `take_timeline`, control
messages between runs), the loop marks its busy / transport / idle intervals in a preallocated
ring (hispec/pipeline/timeline.py); otherwise it pays one `None` check per message and transfer.
"""

from __future__ import annotations

import os
import time
import traceback
from array import array
from dataclasses import dataclass
from pathlib import Path

import ray

from hispec.engine.plan import HeadOutput, StepPlan
from hispec.engine.stage import Stage, run_stage_plan
from hispec.engine.transport import DistributedLink, GroupAddress, Transport, host_store
from hispec.pipeline.messages import (
    Shutdown, SnapshotRequest, StageFailure, StageTimes, StatsRequest, TimelineRequest,
)
from hispec.pipeline.timeline import BUSY, IDLE, TRANSPORT, IntervalRing, Lane


@dataclass(frozen=True)
class StageSpec:
    """What one stage loads and how it runs (validated by the pipeline that makes it)."""

    index: int  # stage s: rank s + 1
    model_path: Path
    layer_range: tuple[int, int]
    with_embeddings: bool
    with_head: bool
    dtype: str = "float32"
    device: str = "cpu"  # "cuda": the GPU Ray assigned to this actor
    threads: int = 1  # torch / OpenMP threads: on a small CPU, one per stage so stages do not fight over cores


class _TimedLink(DistributedLink):
    """Counts the seconds and bytes the stage spends moving rows (a receive's seconds include
    waiting for the previous stage to produce them). While the stage records a timeline, each
    transfer is an interval of its own: the compute before it is closed as busy."""

    def __init__(self, transport: Transport, stage: int, times: StageTimes) -> None:
        super().__init__(transport, stage)
        self.times = times
        self.timeline: IntervalRing | None = None  # set by the stage while it records

    def send(self, hidden):
        timeline = self.timeline
        if timeline is not None:
            timeline.mark(BUSY)
        started = time.perf_counter()
        super().send(hidden)
        self.times.transport += time.perf_counter() - started
        if timeline is not None:
            timeline.mark(TRANSPORT)
        self.times.bytes_sent += hidden.numel() * hidden.element_size()

    def recv(self, shape, dtype, device):
        timeline = self.timeline
        if timeline is not None:
            timeline.mark(BUSY)
        started = time.perf_counter()
        hidden = super().recv(shape, dtype, device)
        self.times.transport += time.perf_counter() - started
        if timeline is not None:
            timeline.mark(TRANSPORT)
        self.times.bytes_received += hidden.numel() * hidden.element_size()
        return hidden


@ray.remote(max_concurrency=2)  # the loop, and `ping` / `describe` beside it
class StageActor:
    def __init__(self, spec: StageSpec) -> None:
        import torch

        from hispec.model import load_model

        torch.set_num_threads(spec.threads)  # also OpenMP's: the C++ layer stack runs on torch's pool
        self.spec = spec
        device = spec.device
        if device == "cuda":
            torch.cuda.set_device(0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        self.model = load_model(spec.model_path, layer_range=spec.layer_range, with_embeddings=spec.with_embeddings,
                                with_head=spec.with_head, dtype=spec.dtype, device=device)
        self.stage: Stage | None = None  # made by allocate_cache, once the pipeline planned the KV layout
        self._store = None
        self.times = StageTimes()
        self._reset_times = False
        self._timeline: IntervalRing | None = None  # recording (between TimelineRequests) or None

    def ping(self) -> int:
        return os.getpid()

    def memory_pool(self) -> tuple[tuple, int]:
        """(which memory this stage's KV would draw on, bytes available there now, weights loaded):
        a CPU stage shares its node's memory with the other CPU stages there; a GPU is its own."""
        from hispec.kv.budget import available_memory

        context = ray.get_runtime_context()
        node = context.get_node_id()
        pool = ("cuda", node, tuple(context.get_accelerator_ids().get("GPU", ()))) if self.spec.device == "cuda" \
            else ("cpu", node)
        return pool, available_memory(self.model.device)

    def allocate_cache(self, num_slots: int, capacity: int) -> int:
        """Make this stage's KV cache for `num_slots` sequences of `capacity` tokens; its bytes."""
        self.stage = Stage(self.model, num_slots, capacity)
        return self.stage.cache.nbytes

    def describe(self) -> dict:
        import torch

        return {"stage": self.spec.index, "layers": list(self.spec.layer_range), "pid": os.getpid(),
                "threads": torch.get_num_threads(), "native": self.model.native_layers,
                "tensors": sorted(self.model.loaded_tensor_names), "device": str(self.model.device)}

    def host_store(self, world_size: int, data_backend: str) -> GroupAddress:
        """Stage 0 hosts the pipeline's rendezvous store (it lives as long as the stage)."""
        host = ray.util.get_node_ip_address()
        self._store, port = host_store(world_size, host)
        return GroupAddress(host, port, world_size, data_backend)

    def serve(self, address: GroupAddress) -> str:
        """The stage loop: join the groups, then answer the driver's messages until Shutdown."""
        import torch

        rank = self.spec.index + 1
        transport = Transport(address, rank, self._store)
        link = _TimedLink(transport, self.spec.index, self.times)
        times = self.times
        try:
            with torch.inference_mode():
                while True:
                    waited = time.perf_counter()
                    message = transport.recv_object(0)
                    started = time.perf_counter()
                    times.idle += started - waited
                    if self._timeline is not None:
                        self._timeline.mark(IDLE)
                    if isinstance(message, Shutdown):
                        return "shutdown"
                    moving = times.transport
                    try:
                        reply = self._handle(message, link)
                    except Exception as error:  # noqa: BLE001 - the driver raises it; this stage is now unusable
                        reply = StageFailure(self.spec.index, self.spec.layer_range, _one_line(error),
                                             traceback.format_exc())
                    sent = time.perf_counter()
                    times.busy += (sent - started) - (times.transport - moving)  # rows moved count as transport
                    if self._timeline is not None:  # read again: this message may have started or taken it
                        self._timeline.mark(BUSY)
                    transport.send_object(reply, 0)
                    times.transport += time.perf_counter() - sent
                    if self._timeline is not None:
                        self._timeline.mark(TRANSPORT)
                    if self._reset_times:
                        times.__init__()
                        self._reset_times = False
                    if isinstance(reply, StageFailure):
                        return "failed"
        finally:
            transport.close()

    def _handle(self, message, link: DistributedLink):
        if isinstance(message, StepPlan):
            heads = run_stage_plan(self.stage, message, link)
            self.times.steps += 1
            return {i: {slot: HeadOutput(h.argmax, None if h.logits is None else h.logits.cpu())
                            if isinstance(h, HeadOutput) else h  # an AheadOutput: plain ints
                        for slot, h in by_slot.items()} for i, by_slot in heads.items()}
        if isinstance(message, SnapshotRequest):
            return self.stage.snapshot(message.with_tensors)
        if isinstance(message, StatsRequest):
            self._reset_times = message.reset  # after this message's own time is counted (serve)
            return StageTimes(**vars(self.times))
        if isinstance(message, TimelineRequest):
            return self._timeline_request(message, link)
        raise TypeError(f"unknown control message {type(message).__name__}")

    def _timeline_request(self, message: TimelineRequest, link: _TimedLink):
        """Start recording into a fresh ring (None), or stop and return what was recorded (a Lane)."""
        if message.take:
            ring, self._timeline, link.timeline = self._timeline, None, None
            name = f"stage {self.spec.index}"
            return ring.lane(name) if ring is not None else Lane(name, b"", array("q"), array("q"))  # not recording
        self._timeline = link.timeline = IntervalRing(message.capacity)
        return None


def _one_line(error: BaseException) -> str:
    """`Type: first line of the message` (gloo's messages run to several lines of advice)."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__
