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

import torch

from hispec.model.model import EarlyExitModel
from hispec.spec.engine import ForwardShape

PROBE_LAYERS = 10**6  # layers timed per forward measurement: all of them, so weights stream from memory as in a real step


class CostTable:
    def __init__(self, model: EarlyExitModel, context: int, repeats: int = 15) -> None:
        self.model, self.context, self.repeats = model, context, repeats
        self.forward: dict[tuple[int, int, bool], tuple[float, float]] = {}  # (B, T, prefill) -> (plan s, layer s)
        self.head: dict[int, float] = {}  # rows -> seconds

    def _median(self, fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(self.repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    @torch.inference_mode()
    def _measure_forward(self, batch: int, tokens: int, prefill: bool) -> tuple[float, float]:
        model = self.model
        layers = min(PROBE_LAYERS, model.config.num_layers)
        start = 0 if prefill else min(self.context, model.config.max_position_embeddings - tokens - batch)
        cache = model.new_cache(num_slots=batch, capacity=start + tokens + batch, layer_range=(0, layers))
        # decode-time batches are ragged: sequences sit at different lengths
        starts = [start + (b if not prefill else 0) for b in range(batch)]
        hidden = torch.randn(batch, tokens, model.config.hidden_size, dtype=model.dtype, device=model.device)
        slots = list(range(batch))

        def reset():
            cache.set_lengths((0, layers), slots, starts)

        def plan():
            reset()
            return model.plan(cache, slots, tokens)

        step = plan()

        def forward():
            reset()
            model.forward_layers(hidden, step, cache, 0, layers)

        return self._median(plan), self._median(forward) / layers

    @torch.inference_mode()
    def _measure_head(self, rows: int) -> float:
        hidden = torch.randn(rows, self.model.config.hidden_size, dtype=self.model.dtype, device=self.model.device)
        return self._median(lambda: self.model.exit_logits(hidden).argmax(-1).tolist())

    def forward_seconds(self, shape: ForwardShape) -> float:
        key = (shape.batch, shape.tokens, shape.prefill)
        if key not in self.forward:
            self.forward[key] = self._measure_forward(*key)
        plan, layer = self.forward[key]
        seconds = plan + shape.layers * layer
        if shape.head_rows:
            if shape.head_rows not in self.head:
                self.head[shape.head_rows] = self._measure_head(shape.head_rows)
            seconds += self.head[shape.head_rows]
        return seconds

    def price(self, log: Counter) -> float:
        """Seconds the forwards in `log` cost at the measured per-shape rates."""
        return sum(count * self.forward_seconds(shape) for shape, count in log.items())

    def to_dict(self) -> dict:
        return {
            "context": self.context,
            "forward_us": {f"B{b}xT{t}{'-prefill' if p else ''}": {"plan": round(pl * 1e6, 1), "per_layer": round(la * 1e6, 1)}
                           for (b, t, p), (pl, la) in sorted(self.forward.items())},
            "head_us": {str(rows): round(s * 1e6, 1) for rows, s in sorted(self.head.items())},
        }
