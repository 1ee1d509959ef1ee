"""Where each pipeline process spends its time, interval by interval: a bounded ring that a stage
loop (or the driver) marks as it goes, and the window of a recording that `hispec bench --timeline`
draws.

    ring = IntervalRing(20_000)       # preallocated; starts the clock now
    ...                               # waiting for a message
    ring.mark(IDLE)                   # [previous mark, now) was idle
    ...                               # running layers
    ring.mark(BUSY)
    lane = ring.lane("stage 0")       # the intervals, oldest first

Each mark closes the interval that began at the previous one, so a lane's intervals tile its
recorded span with no gap and no overlap. Times are `time.monotonic_ns()` (CLOCK_MONOTONIC on
Linux), one clock for every process of the machine: the lanes of the stages and the driver line
up without any translation. A mark is one clock read and three stores into preallocated arrays
(a few hundred ns in CPython); code that is not recording holds no ring and pays a `None` check.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

BUSY, TRANSPORT, IDLE = 0, 1, 2
KINDS = ("busy", "transport", "idle")  # by kind number: the JSON's and the plot's names

# What each kind means on a stage's lane and on the driver's (written into the JSON beside them).
STAGE_MEANING = {
    "busy": "running its layers and heads (and the stage loop's Python)",
    "transport": "moving hidden rows to/from the neighbouring stage (a receive includes waiting for the "
                 "previous stage to produce them) and sending its reply to the driver",
    "idle": "waiting for the driver's next plan (and unpickling it)",
}
DRIVER_MEANING = {
    "busy": "Python between steps: the engine, scheduler and decider, building the next plans",
    "transport": "pickling and sending the step's plans to the stages",
    "idle": "waiting for the stages' replies (and unpickling them)",
}
DEFAULT_CAPACITY = 20_000


@dataclass(frozen=True)
class Lane:
    """One process's recorded intervals, oldest first: interval i is [starts[i], ends[i]) ns of
    kind kinds[i] (BUSY / TRANSPORT / IDLE). Plain data: pickled from a stage to the driver."""

    name: str
    kinds: bytes
    starts: array  # 'q', ns on CLOCK_MONOTONIC
    ends: array
    dropped: int = 0  # older intervals the ring overwrote

    def __len__(self) -> int:
        return len(self.kinds)

    @property
    def span(self) -> tuple[int, int] | None:
        """[first start, last end) ns, None if nothing was recorded."""
        return (self.starts[0], self.ends[-1]) if self.kinds else None


class IntervalRing:
    """The last `capacity` intervals of one process, in preallocated arrays (no allocation per mark)."""

    __slots__ = ("capacity", "_kinds", "_starts", "_ends", "_next", "_count", "_last")

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"a ring needs room for at least one interval, got {capacity}")
        self.capacity = capacity
        self._kinds = bytearray(capacity)
        self._starts = array("q", bytes(8 * capacity))
        self._ends = array("q", bytes(8 * capacity))
        self._next = 0  # where the next interval goes
        self._count = 0  # intervals marked, overwritten ones included
        self._last = time.monotonic_ns()  # the end of the last interval: the start of the next

    def mark(self, kind: int, _now=time.monotonic_ns) -> None:
        """The interval since the previous mark (or since the ring was made) was of `kind`."""
        now = _now()
        i = self._next
        self._kinds[i] = kind
        self._starts[i] = self._last
        self._ends[i] = now
        self._last = now
        self._next = i + 1 if i + 1 < self.capacity else 0
        self._count += 1

    def lane(self, name: str) -> Lane:
        """What the ring holds, oldest first (copies: the ring may go on recording)."""
        count, i = self._count, self._next
        if count <= self.capacity:
            return Lane(name, bytes(self._kinds[:count]), self._starts[:count], self._ends[:count])
        return Lane(name, bytes(self._kinds[i:] + self._kinds[:i]), self._starts[i:] + self._starts[:i],
                    self._ends[i:] + self._ends[:i], dropped=count - self.capacity)


def middle_window(lanes: Sequence[Lane], length_ns: int) -> tuple[int, int]:
    """A window of `length_ns` centred on the middle of the time every lane recorded (the whole
    of that time if it is shorter): the part of a run where every process was being watched,
    away from its start and end."""
    spans = [lane.span for lane in lanes if lane.span is not None]
    if len(spans) < len(lanes) or not spans:
        empty = [lane.name for lane in lanes if lane.span is None]
        raise ValueError(f"no intervals recorded on {empty or 'any lane'}")
    first, last = max(s for s, _ in spans), min(e for _, e in spans)
    if first >= last:
        raise ValueError("the lanes' recorded spans do not overlap")
    if last - first <= length_ns:
        return first, last
    middle = (first + last) // 2
    return middle - length_ns // 2, middle - length_ns // 2 + length_ns


def clipped(lane: Lane, start: int, end: int) -> list[tuple[int, int, int]]:
    """(kind, start, end) of the lane's intervals inside [start, end), cut at its edges."""
    out = []
    for kind, s, e in zip(lane.kinds, lane.starts, lane.ends):
        if e > start and s < end:
            out.append((kind, max(s, start), min(e, end)))
    return out


def window_report(lanes: Sequence[Lane], start: int, end: int, meanings: Sequence[dict] | None = None,
                  details: Sequence[dict] | None = None) -> dict:
    """The window [start, end) as JSON-ready data: per lane, its intervals (kind, start ms, end ms,
    from the window's start) and its busy / transport / idle seconds and shares of the window
    (shares sum to 1 where a lane recorded the whole window: its intervals tile it). `meanings`:
    per lane, what each kind means there; `details`: per lane, extra fields (e.g. its layers)."""
    length = end - start
    out = []
    for i, lane in enumerate(lanes):
        intervals = clipped(lane, start, end)
        totals = [0, 0, 0]
        for kind, s, e in intervals:
            totals[kind] += e - s
        entry = {"lane": lane.name} | (dict(details[i]) if details else {})
        entry |= {"seconds": {KINDS[k]: round(totals[k] / 1e9, 6) for k in range(3)},
                  "shares": {KINDS[k]: round(totals[k] / length, 4) for k in range(3)},
                  "intervals_in_window": len(intervals), "intervals_recorded": len(lane),
                  "intervals_dropped": lane.dropped}
        if meanings:
            entry["meaning"] = dict(meanings[i])
        entry["intervals"] = [[KINDS[k], round((s - start) / 1e6, 4), round((e - start) / 1e6, 4)]
                              for k, s, e in intervals]
        out.append(entry)
    return {"clock": "CLOCK_MONOTONIC (time.monotonic_ns), shared by every process of the machine",
            "window": {"start_ns": start, "end_ns": end, "length_ms": round(length / 1e6, 3)},
            "lanes": out}


def busy_at_once(lanes: Sequence[Lane], start: int, end: int) -> dict[str, float]:
    """Shares of the window [start, end) during which 0, 1, ..., len(lanes) of the lanes were busy
    at the same time: the overlap the picture shows, as numbers (a pipeline that does not overlap
    has no share above "1")."""
    events = sorted((t, step) for lane in lanes for kind, s, e in clipped(lane, start, end) if kind == BUSY
                    for t, step in ((s, 1), (e, -1)))  # at equal times an end sorts before a start
    time_at = [0] * (len(lanes) + 1)
    level, at = 0, start
    for t, step in events:
        time_at[level] += t - at
        level, at = level + step, t
    time_at[level] += end - at
    return {str(k): round(v / (end - start), 4) for k, v in enumerate(time_at)}
