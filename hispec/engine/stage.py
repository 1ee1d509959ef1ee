"""A stage: layers [lo, hi) of an early-exit model, their KV cache, and the rings of the exits it owns.

One stage over [0, L) is the single-process engine; a pipeline has several (hispec.pipeline), each
running `run_stage_plan` on every plan. A forward of layers [a, b) touches a stage in one of three ways:
  - compute: [a, b) overlaps [lo, hi). Input: token ids (a == 0), this stage's ring at exit a
    (lo < a), or hidden rows from the previous stage (a <= lo). Output: the ring at exit b and the
    exit head (b <= hi), or hidden rows to the next stage (b > hi);
  - source: a == hi, the input ring at exit a lives here: its rows go to the next stage;
  - nothing.
Rows move between neighbouring stages through a `StageLink` in forward order, so a stage never
waits for anything but its predecessor.
"""

from __future__ import annotations

from typing import Protocol

import torch

from hispec.engine.ahead import speculate_ahead
from hispec.engine.plan import Feed, Forward, HeadOutput, KVSnapshot, RingKey, StepPlan
from hispec.model.model import EarlyExitModel


class StageLink(Protocol):
    """A stage's two neighbours: hidden rows [B, T, d] in forward order."""

    def send(self, hidden: torch.Tensor) -> None: ...  # to the next stage

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor: ...  # from the previous


class Stage:
    def __init__(self, model: EarlyExitModel, num_slots: int, capacity: int) -> None:
        """`num_slots` sequences of at most `capacity` tokens (prompt + new): a sequence never runs
        its last token through the model, so the KV cache holds capacity - 1 tokens per slot."""
        if capacity < 2:
            raise ValueError(f"a sequence needs a capacity of at least 2 tokens, got {capacity}")
        self.model = model
        self.lo, self.hi = model.layer_range
        self.cache = model.new_cache(num_slots=num_slots, capacity=capacity - 1)
        self.device, self.dtype, self.hidden_size = model.device, model.dtype, model.config.hidden_size
        self.rings: dict[RingKey, torch.Tensor] = {}  # allocated on first use

    # ---- cache control ---------------------------------------------------------------------
    def apply_cache_ops(self, plan: StepPlan) -> None:
        for t in plan.truncations:
            if t.layer_hi > self.lo:
                self.cache.rollback((self.lo, min(t.layer_hi, self.hi)), [t.slot], [t.length])
        if plan.releases:
            self.cache.release(plan.releases)

    def snapshot(self, with_tensors: bool = False) -> KVSnapshot:
        """KV lengths of every slot (and with_tensors: its valid keys/values and the rings)."""
        layers = range(self.lo, self.hi)
        lengths = {s: [self.cache.length(layer, s) for layer in layers] for s in range(self.cache.num_slots)}
        if not with_tensors:
            return KVSnapshot((self.lo, self.hi), lengths)
        keys, values = {}, {}
        for s in range(self.cache.num_slots):
            pairs = [self.cache.slot_tensors(layer, s) for layer in layers]
            keys[s] = [k.cpu().clone() for k, _ in pairs]
            values[s] = [v.cpu().clone() for _, v in pairs]
        return KVSnapshot((self.lo, self.hi), lengths, keys, values, {key: r.cpu().clone() for key, r in self.rings.items()})

    # ---- forwards ----------------------------------------------------------------------------
    def receives(self, fwd: Forward) -> bool:
        return receives(self.lo, fwd)

    def sends(self, fwd: Forward) -> bool:
        return sends(self.hi, fwd)

    def computes(self, fwd: Forward) -> bool:
        return computes(self.lo, self.hi, fwd)

    def run(self, fwd: Forward, incoming: torch.Tensor | None) -> tuple[torch.Tensor | None, dict[int, HeadOutput]]:
        """This stage's part of `fwd`: (rows for the next stage or None, head outputs by slot)."""
        if not self.computes(fwd):  # source: the ring at exit fwd.lo feeds the next stage
            return self._ring_read(fwd.input_ring, fwd), {}
        model, feeds, T = self.model, fwd.feeds, fwd.width
        lo, hi = max(fwd.lo, self.lo), min(fwd.hi, self.hi)
        step = model.plan(self.cache, [f.slot for f in feeds], [f.count for f in feeds], layer=lo)
        for b, f in enumerate(feeds):  # the scheduler's view and this stage's cache must agree
            if int(step.starts[b]) != f.start:
                raise RuntimeError(f"stage [{self.lo}, {self.hi}): slot {f.slot} holds {int(step.starts[b])} tokens "
                                   f"in layer {lo}, the plan starts at {f.start}")
        if incoming is not None:
            hidden = incoming
        elif fwd.lo == 0:
            hidden = model.embed_ids([list(f.token_ids) + [0] * (T - f.count) for f in feeds])
        else:
            hidden = self._ring_read(fwd.input_ring, fwd)  # [B, T, d]
        ends_here = fwd.hi <= self.hi
        # One sequence's block of the output ring is a contiguous view: the layers write into it.
        columns = self._columns(fwd.output_ring, fwd) if ends_here and fwd.output_ring else None
        into_ring = isinstance(columns, slice)
        out = self._ring_view(fwd.output_ring, feeds[0].slot, columns) if into_ring else None
        hidden = model.forward_layers(hidden, step, self.cache, lo, hi, out)  # [B, T, d]
        if not ends_here:
            return hidden, {}
        if columns is not None and not into_ring:
            self._ring(fwd.output_ring)[self._slot_rows(feeds), columns] = hidden
        return None, self._head(fwd, hidden)

    def _head(self, fwd: Forward, hidden: torch.Tensor) -> dict[int, HeadOutput]:
        """The exit head on the feeds' last `head_rows` tokens (one call for the whole forward)."""
        wanted = [(b, f) for b, f in enumerate(fwd.feeds) if f.head_rows]
        if not wanted:
            return {}
        T = hidden.shape[1]
        if len(fwd.feeds) == 1:
            f = fwd.feeds[0]
            rows_hidden = hidden[:, f.count - f.head_rows : f.count]  # [1, rows, d], a view
        else:
            flat = [b * T + t for b, f in wanted for t in range(f.count - f.head_rows, f.count)]
            rows_hidden = hidden.reshape(-1, hidden.shape[-1])[torch.tensor(flat, device=hidden.device)]
        logits, argmax = self.model.exit_head(rows_hidden, fwd.head_vocab)  # [N, V] (host sync: argmax)
        out, row = {}, 0
        for _, f in wanted:
            out[f.slot] = HeadOutput(argmax[row : row + f.head_rows], logits[row : row + f.head_rows] if f.logits else None)
            row += f.head_rows
        return out

    def ring_head(self, key: RingKey, slot: int, position: int, head_vocab: int | None = None) -> int:
        """The exit head's argmax on the row of `position` in the ring `key` (host sync)."""
        column = position % key.window
        _, argmax = self.model.exit_head(self._ring(key)[slot : slot + 1, column : column + 1], head_vocab)
        return argmax[0]

    # ---- rings -------------------------------------------------------------------------------
    def _ring(self, key: RingKey) -> torch.Tensor:
        ring = self.rings.get(key)
        if ring is None:
            if not self.lo < key.exit <= self.hi:
                raise RuntimeError(f"stage [{self.lo}, {self.hi}) does not own the ring at exit {key.exit}")
            shape = (self.cache.num_slots, key.window + 1, self.hidden_size)
            ring = self.rings[key] = torch.zeros(shape, dtype=self.dtype, device=self.device)
        return ring

    def _columns(self, key: RingKey, fwd: Forward) -> slice | torch.Tensor:
        """Ring columns of each feed's tokens [B, T] (padding -> scratch column W); a plain slice
        when one sequence's tokens do not wrap around the ring (the common case at batch 1)."""
        W, T, feeds = key.window, fwd.width, fwd.feeds
        if len(feeds) == 1 and feeds[0].start % W + T <= W:
            first = feeds[0].start % W
            return slice(first, first + T)
        return torch.tensor([[(f.start + t) % W if t < f.count else W for t in range(T)] for f in feeds],
                            device=self.device)

    def _slot_rows(self, feeds: tuple[Feed, ...]) -> torch.Tensor:
        return torch.tensor([[f.slot] for f in feeds], device=self.device)  # [B, 1]

    def _ring_view(self, key: RingKey, slot: int, columns: slice) -> torch.Tensor:
        return self._ring(key)[slot : slot + 1, columns]  # [1, T, d], a view

    def _ring_read(self, key: RingKey, fwd: Forward) -> torch.Tensor:
        columns = self._columns(key, fwd)
        if isinstance(columns, slice):
            return self._ring_view(key, fwd.feeds[0].slot, columns)
        return self._ring(key)[self._slot_rows(fwd.feeds), columns]  # [B, T, d], gathered


def receives(lo: int, fwd: Forward) -> bool:
    """Whether a stage starting at layer `lo` takes `fwd`'s input from the previous stage."""
    return lo > 0 and fwd.lo <= lo < fwd.hi


def sends(hi: int, fwd: Forward) -> bool:
    """Whether a stage ending at layer `hi` hands `fwd`'s rows on (computed there, or read from its ring)."""
    return fwd.lo <= hi < fwd.hi


def computes(lo: int, hi: int, fwd: Forward) -> bool:
    return max(fwd.lo, lo) < min(fwd.hi, hi)


def takes_part(layer_range: tuple[int, int], plan: StepPlan) -> bool:
    """Whether a stage owning `layer_range` has anything to do for `plan`'s forwards (the first
    stage also runs the speculations ahead)."""
    lo, hi = layer_range
    return (bool(plan.aheads) and lo == 0) or any(computes(lo, hi, f) or sends(hi, f) or receives(lo, f)
                                                   for f in plan.forwards)


def run_stage_plan(stage: Stage, plan: StepPlan, link: StageLink | None) -> dict[int, dict]:
    """Everything `plan` asks of `stage`, in forward order: {forward index: head outputs by slot},
    then (first stage) {len(forwards) + j: {slot: AheadOutput}} for the plan's speculations ahead."""
    stage.apply_cache_ops(plan)
    heads: dict[int, dict] = {}
    for i, fwd in enumerate(plan.forwards):
        incoming = None
        if stage.receives(fwd):
            incoming = link.recv((len(fwd.feeds), fwd.width, stage.hidden_size), stage.dtype, stage.device)
        if not (stage.computes(fwd) or stage.sends(fwd)):
            continue
        outgoing, head = stage.run(fwd, incoming)
        if stage.sends(fwd):
            link.send(outgoing)
        if head:
            heads[i] = head
    if stage.lo == 0:  # after every row of the step left for the deeper stages
        for j, op in enumerate(plan.aheads):
            heads[len(plan.forwards) + j] = {op.slot: speculate_ahead(stage, op)}
    return heads
