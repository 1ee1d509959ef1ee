"""A cost table timed apart from the benchmark: seconds per forward shape, measured on the model
outside any measured run, so that a prediction priced with it uses no time of the run it predicts.

Shapes are the scheduler's (`hispec.engine.ForwardShape`): a forward of `layers` layers over
`batch` sequences of `tokens` tokens each (padded: the engine pads a ragged batch to its widest
sequence), then the exit head on `head_rows` rows scoring `head_vocab` tokens (0: all). The table
keeps two parts, because the head's cost does not depend on the layers before it:

- forward (layers, batch, tokens, prefill) -> planning (`model.plan`) + `model.forward_layers`;
- head (rows, vocabulary) -> `model.exit_head` (logits and the greedy argmax).

A decode forward is timed after `context` tokens of KV in every slot (the benchmark's typical
context: mean prompt length plus half the new tokens), a prefill forward from position 0. Shapes
are timed in rounds, each round visiting every shape once in a shuffled order, and the median
over rounds is kept: consecutive calls are different shapes, as in a real step (an isolated loop
over one shape keeps its weights in cache and reads too cheap), and the median resists this
noisy machine's outliers.

The table is cached as JSON with what it was timed on (machine, threads, model, dtype, runtime,
context); a cache timed on anything else is not reused.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hispec.engine import ForwardShape
from hispec.model.model import EarlyExitModel

ForwardKey = tuple[int, int, int, bool]  # (layers, batch, tokens per sequence, prefill)
HeadKey = tuple[int, int]  # (rows, vocabulary scored: 0 = all)


def forward_key(shape: ForwardShape) -> ForwardKey:
    return (shape.layers, shape.batch, shape.tokens, bool(shape.prefill))


def head_key(shape: ForwardShape) -> HeadKey | None:
    return (shape.head_rows, shape.head_vocab) if shape.head_rows else None


def cpu_name() -> str:
    """The CPU's model name (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class TimedOn:
    """What a cost table's numbers depend on; a cached table is reused only if all of it matches."""

    machine: str  # CPU model and host name
    logical_cpus: int
    threads: int  # torch intra-op threads while timing
    model: str
    layers: int
    hidden_size: int
    dtype: str
    native_layers: bool  # the C++ layer loop or the Python one
    context: int  # KV tokens in every slot before a decode forward

    @classmethod
    def current(cls, model: EarlyExitModel, model_name: str, context: int) -> "TimedOn":
        return cls(machine=f"{cpu_name()} ({platform.node()})", logical_cpus=os.cpu_count() or 0,
                   threads=torch.get_num_threads(), model=model_name, layers=model.config.num_layers,
                   hidden_size=model.config.hidden_size, dtype=str(model.dtype).removeprefix("torch."),
                   native_layers=bool(model.native_layers), context=int(context))


@dataclass
class CostTable:
    """Median seconds per forward and per head call, timed separately (see the module docstring)."""

    timed_on: TimedOn
    forward_samples: dict[ForwardKey, list[float]] = field(default_factory=dict)
    head_samples: dict[HeadKey, list[float]] = field(default_factory=dict)

    # ---- pricing ------------------------------------------------------------------------------
    def seconds(self, shape: ForwardShape) -> float:
        """One forward of `shape` with its head call. KeyError if a part was never timed."""
        key = forward_key(shape)
        if shape.layers and key not in self.forward_samples:
            raise KeyError(f"no timings for forwards of shape {key}")
        total = statistics.median(self.forward_samples[key]) if shape.layers else 0.0  # 0 layers: a head alone
        head = head_key(shape)
        if head is not None:
            if head not in self.head_samples:
                raise KeyError(f"no timings for the exit head on {head[0]} rows (vocabulary {head[1] or 'all'})")
            total += statistics.median(self.head_samples[head])
        return total

    def price(self, log: dict[ForwardShape, int]) -> float:
        """Seconds the forwards in `log` (shape -> count) cost at this table's rates."""
        return sum(count * self.seconds(shape) for shape, count in log.items())

    def missing(self, shapes: Iterable[ForwardShape]) -> tuple[set[ForwardKey], set[HeadKey]]:
        forwards = {forward_key(s) for s in shapes if s.layers} - set(self.forward_samples)
        heads = {k for s in shapes if (k := head_key(s)) is not None} - set(self.head_samples)
        return forwards, heads

    # ---- timing -------------------------------------------------------------------------------
    @torch.inference_mode()
    def time_shapes(self, model: EarlyExitModel, shapes: Iterable[ForwardShape], rounds: int = 7,
                    seconds_per_shape: float = 1.0) -> None:
        """Time every forward and head part of `shapes` not in the table yet: `rounds` rounds
        (a shape whose samples already add up to `seconds_per_shape` stops after 3), medians kept."""
        shapes = list(shapes)
        forwards, heads = self.missing(shapes)
        if not forwards and not heads:
            return
        probes = _forward_probes(model, sorted(forwards), self.timed_on.context)
        probes += [_HeadProbe(model, key) for key in sorted(heads)]
        samples: dict[object, list[float]] = {probe: [] for probe in probes}
        for probe in probes:  # warm-up: first calls allocate
            probe()
        order = random.Random(0)
        for _ in range(rounds):
            order.shuffle(probes)
            for probe in probes:
                taken = samples[probe]
                if len(taken) >= 3 and sum(taken) >= seconds_per_shape:
                    continue
                taken.append(probe())
        for probe, taken in samples.items():
            target = self.forward_samples if isinstance(probe, _ForwardProbe) else self.head_samples
            target[probe.key] = taken

    # ---- cache --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        def us(samples: list[float]) -> float:
            return round(statistics.median(samples) * 1e6, 1)

        return {
            "timed_on": asdict(self.timed_on),
            "forward_us": {_forward_name(key): {"median": us(v), "per_layer": round(us(v) / key[0], 1),
                                                "samples": [round(s * 1e6, 1) for s in v]}
                           for key, v in sorted(self.forward_samples.items())},
            "head_us": {_head_name(key): {"median": us(v), "samples": [round(s * 1e6, 1) for s in v]}
                        for key, v in sorted(self.head_samples.items())},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "CostTable":
        table = cls(TimedOn(**data["timed_on"]))
        table.forward_samples = {_parse_forward(name): [s / 1e6 for s in v["samples"]]
                                 for name, v in data["forward_us"].items()}
        table.head_samples = {_parse_head(name): [s / 1e6 for s in v["samples"]] for name, v in data["head_us"].items()}
        return table

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")


def timed_cost_table(path: Path | None, model: EarlyExitModel, model_name: str, context: int,
                     shapes: Iterable[ForwardShape], rounds: int = 7) -> CostTable:
    """The table cached at `path` if it was timed on this setup, with every shape of `shapes`
    (the ones it lacks timed now and added); otherwise a new one. Saved back to `path`."""
    timed_on = TimedOn.current(model, model_name, context)
    table = None
    if path is not None and path.exists():
        cached = CostTable.from_dict(json.loads(path.read_text()))
        table = cached if cached.timed_on == timed_on else None
    table = table or CostTable(timed_on)
    add_shapes(table, model, shapes, path, rounds)
    return table


def add_shapes(table: CostTable, model: EarlyExitModel, shapes: Iterable[ForwardShape], path: Path | None,
               rounds: int = 7) -> None:
    """Time the parts of `shapes` that `table` lacks, and save it to `path` if it grew."""
    shapes = list(shapes)
    if any(table.missing(shapes)):
        table.time_shapes(model, shapes, rounds)
        if path is not None:
            table.save(path)


def _forward_name(key: ForwardKey) -> str:
    layers, batch, tokens, prefill = key
    return f"{layers}layers-B{batch}xT{tokens}{'-prefill' if prefill else ''}"


def _parse_forward(name: str) -> ForwardKey:
    layers, rest = name.split("layers-B")
    prefill = rest.endswith("-prefill")
    batch, tokens = rest.removesuffix("-prefill").split("xT")
    return (int(layers), int(batch), int(tokens), prefill)


def _head_name(key: HeadKey) -> str:
    rows, vocab = key
    return f"{rows}@{vocab}" if vocab else str(rows)


def _parse_head(name: str) -> HeadKey:
    rows, _, vocab = name.partition("@")
    return (int(rows), int(vocab or 0))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # CPU ops are synchronous; a GPU's must finish inside the timer
        torch.cuda.synchronize(device)


def _forward_probes(model: EarlyExitModel, keys: list[ForwardKey], context: int) -> list["_ForwardProbe"]:
    """A probe per forward shape, all sharing one KV cache (slots 0..B-1 of it, as the engine
    packs a running batch) and one buffer of random hidden states (a contiguous [B, T, d] prefix
    each): a cache per shape would take gigabytes at the benchmark's batch sizes."""
    if not keys:
        return []
    d, limit = model.config.hidden_size, model.config.max_position_embeddings
    starts = [0 if prefill else max(0, min(context, limit - tokens)) for _, _, tokens, prefill in keys]
    capacity = max(start + key[2] for start, key in zip(starts, keys))
    cache = model.new_cache(num_slots=max(key[1] for key in keys), capacity=capacity)
    hidden = torch.randn(max(b * t for _, b, t, _ in keys) * d, dtype=model.dtype, device=model.device)
    return [_ForwardProbe(model, key, start, cache, hidden[: key[1] * key[2] * d].view(key[1], key[2], d))
            for key, start in zip(keys, starts)]


class _ForwardProbe:
    """One forward shape, ready to time: `batch` slots of `cache` holding `start` tokens (a
    typical context; 0 for a prefill) and hidden states [B, T, d]; each call plans and runs
    layers [0, n) of the model, after setting the slots' lengths back to `start`."""

    def __init__(self, model: EarlyExitModel, key: ForwardKey, start: int, cache, hidden: torch.Tensor) -> None:
        self.model, self.key, self.start, self.cache, self.hidden = model, key, start, cache, hidden
        self.slots = list(range(key[1]))
        self.layers = (model.layer_range[0], model.layer_range[0] + key[0])

    def __call__(self) -> float:
        model, cache, (lo, hi) = self.model, self.cache, self.layers
        cache.set_lengths((lo, hi), self.slots, [self.start] * len(self.slots))
        _synchronize(model.device)
        started = time.perf_counter()
        step = model.plan(cache, self.slots, self.key[2], layer=lo)
        model.forward_layers(self.hidden, step, cache, lo, hi)
        _synchronize(model.device)
        return time.perf_counter() - started


class _HeadProbe:
    """The exit head on `rows` random hidden rows [rows, d], scoring `vocab` tokens (0: all)."""

    def __init__(self, model: EarlyExitModel, key: HeadKey) -> None:
        self.model, self.key = model, key
        self.hidden = torch.randn(key[0], model.config.hidden_size, dtype=model.dtype, device=model.device)

    def __call__(self) -> float:
        _synchronize(self.model.device)
        started = time.perf_counter()
        self.model.exit_head(self.hidden, self.key[1] or None)
        _synchronize(self.model.device)
        return time.perf_counter() - started
