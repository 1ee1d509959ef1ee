"""The cost model: what a decoding run should cost, from the forwards it ran and per-shape costs
measured in isolation.

The engine logs every forward by shape (`SpecEngine.forward_log`: layers, sequences, tokens per
sequence, exit-head rows). Acceptance rates decide that log: a method that accepts more runs
fewer, wider target forwards. `CostTable` measures, for each shape that occurs, the seconds of
one forward's planning (positions, mask, rotary rows), of one layer, and of the exit head, on a
cache filled to a typical context length. Pricing the log gives the time the algorithm needs
with this runtime; measured time / that time is the engine's own overhead (scheduling, buffers,
sampling, Python), the part an implementation can remove.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable

import torch

from hispec.model.model import EarlyExitModel
from hispec.spec.engine import ForwardShape



class CostTable:
    def __init__(self, model: EarlyExitModel, context: int, repeats: int = 15) -> None:
        self.model, self.context, self.repeats = model, context, repeats
        self.forward: dict[tuple[int, int, bool], tuple[float, float]] = {}  # (B, T, prefill) -> (plan s, layer s)
        self.head: dict[int, float] = {}  # rows -> seconds

    def measure(self, shapes: Iterable[ForwardShape]) -> None:
        """Measure every shape not measured yet. Repetitions go round-robin over all shapes, so a
        noisy moment on this machine touches every shape alike instead of skewing one."""
        shapes = list(shapes)
        forward_keys = sorted({(s.batch, s.tokens, s.prefill) for s in shapes} - set(self.forward))
        head_keys = sorted({s.head_rows for s in shapes if s.head_rows} - set(self.head))
        probes: dict[tuple, Callable[[], object]] = {}
        for key in forward_keys:
            plan, forward = self._forward_probe(*key)
            probes[("plan", key)], probes[("forward", key)] = plan, forward
        for rows in head_keys:
            probes[("head", rows)] = self._head_probe(rows)
        samples: dict[tuple, list[float]] = {name: [] for name in probes}
        with torch.inference_mode():
            for name, fn in probes.items():
                fn(), fn()  # warm-up
            for _ in range(self.repeats):
                for name, fn in probes.items():
                    started = time.perf_counter()
                    fn()
                    samples[name].append(time.perf_counter() - started)
        layers = self.model.config.num_layers
        for key in forward_keys:
            self.forward[key] = (statistics.median(samples[("plan", key)]),
                                 statistics.median(samples[("forward", key)]) / layers)
        for rows in head_keys:
            self.head[rows] = statistics.median(samples[("head", rows)])

    def _forward_probe(self, batch: int, tokens: int, prefill: bool):
        """(plan, forward) callables for one shape: a forward over every layer (weights stream
        from memory as in a real step), on a cache filled to the typical context."""
        model, layers = self.model, self.model.config.num_layers
        start = 0 if prefill else min(self.context, model.config.max_position_embeddings - tokens - batch)
        cache = model.new_cache(num_slots=batch, capacity=start + tokens + batch)
        starts = [start + (0 if prefill else b) for b in range(batch)]  # decode batches are ragged
        hidden = torch.randn(batch, tokens, model.config.hidden_size, dtype=model.dtype, device=model.device)
        slots = list(range(batch))

        def plan():
            cache.set_lengths((0, layers), slots, starts)
            return model.plan(cache, slots, tokens)

        step = plan()

        def forward():
            cache.set_lengths((0, layers), slots, starts)
            model.forward_layers(hidden, step, cache, 0, layers)

        return plan, forward

    def _head_probe(self, rows: int):
        hidden = torch.randn(rows, self.model.config.hidden_size, dtype=self.model.dtype, device=self.model.device)
        return lambda: self.model.exit_logits(hidden).argmax(-1).tolist()

    def forward_seconds(self, shape: ForwardShape) -> float:
        self.measure([shape])
        plan, layer = self.forward[(shape.batch, shape.tokens, shape.prefill)]
        return plan + shape.layers * layer + (self.head[shape.head_rows] if shape.head_rows else 0.0)

    def price(self, log: Counter) -> float:
        """Seconds the forwards in `log` cost at the measured per-shape rates."""
        self.measure(log)
        return sum(count * self.forward_seconds(shape) for shape, count in log.items())

    def to_dict(self) -> dict:
        return {
            "context": self.context,
            "forward_us": {f"B{b}xT{t}{'-prefill' if p else ''}": {"plan": round(pl * 1e6, 1), "per_layer": round(la * 1e6, 1)}
                           for (b, t, p), (pl, la) in sorted(self.forward.items())},
            "head_us": {str(rows): round(s * 1e6, 1) for rows, s in sorted(self.head.items())},
        }
