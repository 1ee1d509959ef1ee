"""Prometheus metrics through `ray.serve.metrics` (exported by every Ray node's metrics agent).

Names carry the `hispec_` prefix; Ray adds its own `ray_` prefix on export.
"""

from __future__ import annotations

import logging
import threading

from ray.serve.metrics import Counter, Gauge, Histogram

from hispec.serving.engine_loop import LoopSnapshot

log = logging.getLogger(__name__)

_LATENCY_S = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60]
_TOKEN_LATENCY_S = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1]


class EngineMetrics:
    """What one engine replica reports."""

    def __init__(self) -> None:
        self.requests = Counter("hispec_requests_finished", "requests finished, by finish reason",
                                tag_keys=("finish_reason",))
        self.prompt_tokens = Counter("hispec_prompt_tokens", "prompt tokens prefilled")
        self.generated_tokens = Counter("hispec_generated_tokens", "new tokens committed")
        self.proposed = Counter("hispec_proposed_tokens", "proposals checked at a verification level",
                                tag_keys=("hierarchy", "level"))
        self.accepted = Counter("hispec_accepted_tokens", "proposals accepted at a verification level",
                                tag_keys=("hierarchy", "level"))
        self.acceptance = Gauge("hispec_acceptance_rate", "accepted / proposed since the replica started",
                                tag_keys=("hierarchy", "level"))
        self.ttft = Histogram("hispec_time_to_first_token_seconds", "submit to first committed token",
                              boundaries=_LATENCY_S)
        self.inter_token = Histogram("hispec_inter_token_latency_seconds", "time per committed token after the "
                                     "first (a chunk of n tokens after t seconds counts n times t/n)",
                                     boundaries=_TOKEN_LATENCY_S)
        self.latency = Histogram("hispec_request_latency_seconds", "submit to last token", boundaries=_LATENCY_S)
        self.queue_depth = Gauge("hispec_queue_depth", "requests waiting for a KV slot")
        self.active = Gauge("hispec_active_sequences", "sequences being decoded")
        self.kv_slots_used = Gauge("hispec_kv_slots_in_use", "KV cache slots held by sequences")
        self.kv_slots = Gauge("hispec_kv_slots", "KV cache slots of the replica")
        self.step_time = Histogram("hispec_engine_step_seconds", "one engine step (all running sequences)",
                                   boundaries=_TOKEN_LATENCY_S)
        self.busy = Counter("hispec_engine_busy_seconds", "time the engine thread spent in steps")
        self.rejected = Counter("hispec_requests_rejected", "requests refused at once: the replica held as many "
                                "as it may (RESOURCE_EXHAUSTED / 429)")
        self.cancelled = Counter("hispec_requests_cancelled", "requests whose caller went away before the end "
                                 "(their KV slots freed at the next engine step)")
        self._totals: dict[tuple[str, int], list[int]] = {}
        self._lock = threading.Lock()

    def observe_load(self, snap: LoopSnapshot) -> None:
        self.queue_depth.set(snap.queued)
        self.active.set(snap.active)
        self.kv_slots_used.set(snap.active)  # one slot per running sequence
        self.kv_slots.set(snap.slots)
        if snap.step_seconds:
            self.step_time.observe(snap.step_seconds)
            self.busy.inc(snap.step_seconds)

    def observe_tokens(self, count: int, seconds: float, first: bool) -> None:
        """A chunk of `count` tokens arrived `seconds` after the previous one (or the submit)."""
        if first:
            self.ttft.observe(seconds)
            return
        for _ in range(count):
            self.inter_token.observe(seconds / count)

    def observe_finished(self, finish_reason: str, prompt_tokens: int, new_tokens: int, stats: dict,
                         seconds: float) -> None:
        self.requests.inc(tags={"finish_reason": finish_reason})
        self.prompt_tokens.inc(prompt_tokens)
        if new_tokens:
            self.generated_tokens.inc(new_tokens)
        self.latency.observe(seconds)
        for level in stats["levels"][1:]:
            tags = {"hierarchy": stats["hierarchy"], "level": str(level["level"])}
            if level["proposed"]:
                self.proposed.inc(level["proposed"], tags=tags)
            if level["accepted"]:
                self.accepted.inc(level["accepted"], tags=tags)
            with self._lock:
                total = self._totals.setdefault((stats["hierarchy"], level["level"]), [0, 0])
                total[0] += level["proposed"]
                total[1] += level["accepted"]
                if total[0]:
                    self.acceptance.set(total[1] / total[0], tags=tags)


class GpuMonitor:
    """GPU memory and utilization gauges, sampled every `period_s` via nvidia-ml-py; absent GPUs
    (no driver, no device) leave it idle and quiet."""

    def __init__(self, period_s: float = 5.0) -> None:
        self.period_s = period_s
        self._stop = threading.Event()
        self._handles = self._open()
        if not self._handles:
            return
        self.memory_used = Gauge("hispec_gpu_memory_used_bytes", "GPU memory in use", tag_keys=("gpu",))
        self.memory_total = Gauge("hispec_gpu_memory_total_bytes", "GPU memory", tag_keys=("gpu",))
        self.utilization = Gauge("hispec_gpu_utilization_percent", "GPU busy time, percent", tag_keys=("gpu",))
        threading.Thread(target=self._run, name="hispec-gpu-monitor", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    @staticmethod
    def _open() -> list:
        try:
            import pynvml

            pynvml.nvmlInit()
            return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no library, no driver, no device: nothing to report
            return []

    def _run(self) -> None:
        import pynvml

        while not self._stop.wait(self.period_s):
            for index, handle in enumerate(self._handles):
                tags = {"gpu": str(index)}
                try:
                    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                    busy = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
                except pynvml.NVMLError as error:
                    log.debug("nvml read failed on GPU %d: %s", index, error)
                    continue
                self.memory_used.set(memory.used, tags=tags)
                self.memory_total.set(memory.total, tags=tags)
                self.utilization.set(busy, tags=tags)


class IngressMetrics:
    """What the ingress sees: requests by protocol and method, and the errors it returned."""

    def __init__(self) -> None:
        self.requests = Counter("hispec_requests_received", "requests received",
                                tag_keys=("protocol", "method"))
        self.errors = Counter("hispec_request_errors", "requests answered with an error",
                              tag_keys=("protocol", "method", "code"))

    def received(self, protocol: str, method: str) -> None:
        self.requests.inc(tags={"protocol": protocol, "method": method})

    def failed(self, protocol: str, method: str, code: str) -> None:
        self.errors.inc(tags={"protocol": protocol, "method": method, "code": code})
