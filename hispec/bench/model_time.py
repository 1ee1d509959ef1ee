"""The share of a run's wall time spent inside the model: its own calls, timed where they run.

`ModelTimeRecorder.recording(model)` times the model's own work while runs happen — each
forward's planning (positions, mask, rotary rows), its layers, and the exit head — and keeps the
samples per shape (`hispec.engine.ForwardShape`). Pricing a run's forward log with the samples of
that same run (`since(mark)`) gives the time the run spent in model calls; divided by its wall
time that is `model_time_share` in `hispec bench`: 1 - share is the part spent outside the
model's forwards (scheduling, buffers, sampling decisions, Python), the part an implementation
can remove. Per run, then the median over repetitions: the machine's speed drifts between
repetitions, and mixing one run's wall time with another's forward costs would measure the drift.

This is not a prediction (the time comes from the run itself); the cost model's prediction
prices the same log with a table timed apart from the runs (hispec.bench.cost_table,
hispec.bench.costmodel). Means, not medians, here: the expected cost of a call is what a run pays,
so a run priced with its own means equals the summed time of its calls.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from hispec.model.model import EarlyExitModel
from hispec.engine import ForwardShape


_SAMPLES = ("plan_samples", "forward_samples", "head_samples")


class ModelTimeRecorder:
    def __init__(self) -> None:
        self.plan_samples: dict[tuple[int, int, bool], list[float]] = defaultdict(list)  # (B, T, prefill)
        # (layers, B, T, prefill) -> seconds of the whole forward: a forward over few layers carries the
        # same fixed cost (length checks, dispatch warm-up) as a deep one, so cost is not layers x a rate
        self.forward_samples: dict[tuple[int, int, int, bool], list[float]] = defaultdict(list)
        # (rows, vocabulary scored: 0 = all) -> seconds
        self.head_samples: dict[tuple[int, int], list[float]] = defaultdict(list)

    @contextmanager
    def recording(self, model: EarlyExitModel) -> Iterator["ModelTimeRecorder"]:
        """Time `model`'s plan / forward_layers / exit head (exit_logits, exit_head) calls (all on
        the host: CPU ops are synchronous; on a GPU this would need a synchronize per call) while
        the block runs."""
        plan, forward_layers, exit_logits, exit_head = model.plan, model.forward_layers, model.exit_logits, model.exit_head

        def key(step):
            # A prefill is the only forward at position 0 (the engine never mixes it with decoding).
            return (step.batch_size, step.width, int(step.starts[0]) == 0)

        def timed_plan(*args, **kwargs):
            started = time.perf_counter()
            step = plan(*args, **kwargs)
            seconds = time.perf_counter() - started
            self.plan_samples[key(step)].append(seconds)
            return step

        def timed_forward(hidden, step, cache, lo, hi, out=None):
            started = time.perf_counter()
            out = forward_layers(hidden, step, cache, lo, hi, out)
            seconds = time.perf_counter() - started
            self.forward_samples[(hi - lo, *key(step))].append(seconds)
            return out

        def timed(head):
            def timed_head(hidden, vocab_limit=None):
                started = time.perf_counter()
                out = head(hidden, vocab_limit)
                seconds = time.perf_counter() - started
                rows = hidden.shape[0] if hidden.dim() == 2 else hidden.shape[-2]
                self.head_samples[(rows, vocab_limit or 0)].append(seconds)
                return out
            return timed_head

        model.plan, model.forward_layers = timed_plan, timed_forward
        model.exit_logits, model.exit_head = timed(exit_logits), timed(exit_head)
        try:
            yield self
        finally:
            del model.plan, model.forward_layers, model.exit_logits, model.exit_head  # back to the class methods

    def forward_seconds(self, shape: ForwardShape) -> float:
        key = (shape.layers, shape.batch, shape.tokens, shape.prefill)
        if key not in self.forward_samples and shape.prefill:
            # a prompt chunk after the first starts mid-prompt: recorded as a forward not at position 0
            key = (*key[:3], False)
        if key not in self.forward_samples:
            raise KeyError(f"no timings recorded for forwards of shape {key}")
        seconds = statistics.fmean(self.plan_samples[key[1:]]) + statistics.fmean(self.forward_samples[key])
        if shape.head_rows:
            seconds += statistics.fmean(self.head_samples[(shape.head_rows, shape.head_vocab)])
        return seconds

    def price(self, log: Counter) -> float:
        """Seconds the forwards in `log` cost at the recorded per-shape rates."""
        return sum(count * self.forward_seconds(shape) for shape, count in log.items())

    def mark(self) -> dict[str, dict]:
        """How many samples each shape has now; `since(mark)` keeps only later ones."""
        return {name: {key: len(v) for key, v in getattr(self, name).items()} for name in _SAMPLES}

    def since(self, mark: dict[str, dict]) -> "ModelTimeRecorder":
        """A table of the samples recorded after `mark`: the costs of one run, timed in that run.
        Pricing a run's own log with it gives the time that run spent in model work, so
        price / wall time is its efficiency even when the machine's speed drifts between runs."""
        table = ModelTimeRecorder()
        for name in _SAMPLES:
            for key, samples in getattr(self, name).items():
                seen = mark[name].get(key, 0)
                if len(samples) > seen:
                    getattr(table, name)[key] = samples[seen:]
        return table

    def to_dict(self) -> dict:
        def us(samples):
            return round(statistics.fmean(samples) * 1e6, 1)

        return {
            "forward_us": {f"{n}layers-B{b}xT{t}{'-prefill' if p else ''}": {
                "plan": us(self.plan_samples[(b, t, p)]), "forward": us(v), "per_layer": round(us(v) / n, 1),
                "samples": len(v)} for (n, b, t, p), v in sorted(self.forward_samples.items())},
            "head_us": {f"{rows}@{vocab}" if vocab else str(rows): us(v)
                        for (rows, vocab), v in sorted(self.head_samples.items())},
        }
