"""The pipeline timeline without Ray: the interval ring (contiguous marks, wrap-around, cost per
mark), the window from the middle of the lanes' common span, its per-lane shares, and the plot."""

from __future__ import annotations

import json
import time
from array import array

import pytest

from hispec.bench import plots
from hispec.pipeline.timeline import (
    BUSY, DRIVER_MEANING, IDLE, STAGE_MEANING, TRANSPORT, IntervalRing, Lane, busy_at_once, clipped, middle_window,
    window_report,
)

MS = 1_000_000  # ns


def lane(name: str, intervals: list[tuple[int, int, int]]) -> Lane:
    """A lane from (kind, start ms, end ms)."""
    return Lane(name, bytes(k for k, _, _ in intervals), array("q", [s * MS for _, s, _ in intervals]),
                array("q", [e * MS for _, _, e in intervals]))


def test_marks_tile_the_recorded_time_in_order():
    before = time.monotonic_ns()
    ring = IntervalRing(8)
    for kind in (IDLE, BUSY, TRANSPORT, BUSY, TRANSPORT):
        ring.mark(kind)
    after = time.monotonic_ns()
    recorded = ring.lane("stage 0")
    assert recorded.name == "stage 0" and recorded.dropped == 0
    assert list(recorded.kinds) == [IDLE, BUSY, TRANSPORT, BUSY, TRANSPORT]
    assert before <= recorded.starts[0] and recorded.ends[-1] <= after
    assert list(recorded.starts[1:]) == list(recorded.ends[:-1])  # each starts where the last ended
    assert all(s <= e for s, e in zip(recorded.starts, recorded.ends))


def test_a_full_ring_keeps_the_last_intervals_oldest_first():
    ring = IntervalRing(4)
    kinds = [BUSY, IDLE, TRANSPORT, BUSY, IDLE, IDLE, TRANSPORT]
    for kind in kinds:
        ring.mark(kind)
    recorded = ring.lane("driver")
    assert len(recorded) == 4 and recorded.dropped == 3
    assert list(recorded.kinds) == kinds[-4:]
    assert list(recorded.starts[1:]) == list(recorded.ends[:-1])  # still contiguous across the wrap
    ring.mark(BUSY)  # the lane taken earlier is a copy
    assert list(recorded.kinds) == kinds[-4:] and len(ring.lane("driver")) == 4


def test_a_mark_costs_well_under_a_microsecond():
    ring = IntervalRing(20_000)
    best = float("inf")
    for _ in range(5):  # the best of a few rounds: the machine is shared
        started = time.perf_counter_ns()
        for _ in range(20_000):
            ring.mark(BUSY)
        best = min(best, (time.perf_counter_ns() - started) / 20_000)
    assert best < 1000, f"{best:.0f} ns per mark"


def test_the_window_is_the_middle_of_the_time_every_lane_recorded():
    stage = lane("stage 0", [(IDLE, 0, 100), (BUSY, 100, 900), (TRANSPORT, 900, 1000)])
    driver = lane("driver", [(BUSY, 200, 600), (IDLE, 600, 1200)])
    assert middle_window([stage, driver], 200 * MS) == (500 * MS, 700 * MS)  # common span [200, 1000)
    assert middle_window([stage, driver], 5000 * MS) == (200 * MS, 1000 * MS)  # shorter than asked: all of it
    with pytest.raises(ValueError, match="stage 1"):
        middle_window([stage, lane("stage 1", [])], 200 * MS)
    with pytest.raises(ValueError, match="do not overlap"):
        middle_window([stage, lane("late", [(BUSY, 2000, 3000)])], 200 * MS)


def test_intervals_are_cut_at_the_window_and_shares_sum_to_one():
    stage = lane("stage 0", [(IDLE, 0, 100), (BUSY, 100, 300), (TRANSPORT, 300, 350), (IDLE, 350, 1000)])
    driver = lane("driver", [(BUSY, 0, 150), (TRANSPORT, 150, 160), (IDLE, 160, 1000)])
    assert clipped(stage, 50 * MS, 320 * MS) == [(IDLE, 50 * MS, 100 * MS), (BUSY, 100 * MS, 300 * MS),
                                                  (TRANSPORT, 300 * MS, 320 * MS)]
    report = window_report([stage, driver], 50 * MS, 450 * MS, [STAGE_MEANING, DRIVER_MEANING],
                           [{"layers": [0, 6]}, {}])
    json.dumps(report)  # JSON-ready
    assert report["window"]["length_ms"] == 400
    first, second = report["lanes"]
    assert first["lane"] == "stage 0" and first["layers"] == [0, 6] and "layers" not in second
    assert first["shares"] == {"busy": 0.5, "transport": 0.125, "idle": 0.375}
    assert second["shares"] == {"busy": 0.25, "transport": 0.025, "idle": 0.725}
    assert first["intervals"][0] == ["idle", 0, 50] and first["intervals"][-1] == ["idle", 300, 400]
    assert first["meaning"] == STAGE_MEANING and second["meaning"] == DRIVER_MEANING
    for entry in report["lanes"]:
        assert sum(entry["shares"].values()) == pytest.approx(1)


def test_busy_at_once_measures_the_overlap_of_the_lanes():
    first = lane("stage 0", [(BUSY, 0, 40), (BUSY, 40, 60), (TRANSPORT, 60, 70), (IDLE, 70, 100)])
    second = lane("stage 1", [(IDLE, 0, 50), (BUSY, 50, 90), (IDLE, 90, 100)])
    # busy: stage 0 [0, 60) (two touching intervals are one stretch), stage 1 [50, 90)
    assert busy_at_once([first, second], 0, 100 * MS) == {"0": 0.1, "1": 0.8, "2": 0.1}
    assert busy_at_once([first, second], 55 * MS, 65 * MS) == {"0": 0.0, "1": 0.5, "2": 0.5}
    assert busy_at_once([second], 0, 100 * MS) == {"0": 0.6, "1": 0.4}


def test_the_plot_draws_a_lane_per_process(tmp_path):
    stages = [lane(f"stage {s}", [(IDLE, 0, 10 + s), (BUSY, 10 + s, 40), (TRANSPORT, 40, 42), (IDLE, 42, 100)])
              for s in range(2)]
    driver = lane("driver", [(BUSY, 0, 5), (TRANSPORT, 5, 6), (IDLE, 6, 45), (BUSY, 45, 100)])
    report = window_report(stages + [driver], 0, 100 * MS)
    plots.timeline(report, tmp_path / "timeline.png", "a test")
    assert (tmp_path / "timeline.png").stat().st_size > 5000
