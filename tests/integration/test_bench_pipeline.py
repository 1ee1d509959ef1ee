"""`hispec bench --pipeline-stages 2`: pipelined rows beside the single-process ones, with each
stage's timing and the bytes moved per token (a real run on a local Ray instance, small sizes)."""

from __future__ import annotations

import json

import pytest

from hispec.bench import speed

pytestmark = pytest.mark.slow


def test_pipelined_rows_beside_the_single_process_ones(tmp_path):
    assert speed.main(["--methods", "ar,hispec", "--pipeline-stages", "2", "--num-prompts", "2", "--max-new-tokens", "8",
                       "--repeats", "2", "--batch-sizes", "1,2", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["methods"]) == ["ar", "hispec", "ar-pp2", "hispec-pp2"]
    assert results["config"]["pipeline_stages"] == 2
    for batch, entries in results["batch_sizes"].items():
        assert set(entries) == {"ar", "hispec", "ar-pp2", "hispec-pp2"}, batch
        for name, entry in entries.items():
            assert entry["identical_to_ar"] and len(entry["seconds"]) == 2, (batch, name)
            assert entry["repetitions_compared"] == 2 and entry["mismatches"] == [], (batch, name)
            assert entry["predicted_tokens_per_s"] > 0, (batch, name)  # pipelined: its forwards as if in one process
        assert "pipeline" not in entries["hispec"]
        for name in ("ar-pp2", "hispec-pp2"):
            report = entries[name]["pipeline"]
            assert report["bounds"][0] == 0 and report["bounds"][-1] == 16 and len(report["stages"]) == 2
            if name == "hispec-pp2":
                assert report["bounds"] == [0, 6, 16]  # stage 0 ends at the verifier's exit
            for stage in report["stages"]:
                shares = stage["busy_share"] + stage["transport_share"] + stage["idle_share"]
                assert 0.85 < shares < 1.2, (batch, name, stage)  # the stage loop's time is the run's
                assert stage["busy_s"] > 0 and stage["steps"] > 0
            # stage 0 sends what stage 1 receives; at most one boundary crossed per step (2 stages)
            assert report["stages"][0]["bytes_sent"] == report["stages"][1]["bytes_received"] > 0
            assert report["hidden_bytes_per_token"] > 0 and report["plan_bytes_per_token"] > 0
            # the rows the plans' prompt forwards move (counted by the driver) are part of what moved
            assert 0 < report["prefill_hidden_bytes"] < report["hidden_bytes"] == report["stages"][0]["bytes_sent"]
            assert 0 < report["decode_hidden_bytes_per_token"] < report["hidden_bytes_per_token"]
            assert 0 < report["hops_per_token"] <= report["steps_per_token"]
    assert set(results["pipeline_speedups"]["2"]) == {"ar-pp2/ar", "hispec-pp2/hispec"}
    assert set(results["crossover_batch_size"]) == {"hispec", "hispec-pp2"}
    for png in ("tokens_per_s.png", "acceptance.png", "throughput_vs_batch.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_timeline_draws_every_stage_and_the_driver(tmp_path):
    """`--timeline`: one recorded run of hispec-pp2 after the timed ones; a lane per stage and the
    driver, each tiling the window with busy / transport / idle intervals that do not overlap."""
    assert speed.main(["--methods", "ar,hispec", "--pipeline-stages", "2", "--timeline", "--num-prompts", "2",
                       "--max-new-tokens", "16", "--repeats", "1", "--batch-sizes", "1",
                       "--timeline-ms", "100", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "timeline.png").stat().st_size > 5000
    assert not (tmp_path / "timeline-batch8.json").exists()  # batch 8 was not measured
    report = json.loads((tmp_path / "timeline.json").read_text())
    assert report["method"] == "hispec-pp2" and report["batch_size"] == 1 and report["identical_to_ar"]
    assert [lane["lane"] for lane in report["lanes"]] == ["stage 0", "stage 1", "driver"]
    assert [lane.get("layers") for lane in report["lanes"]] == [[0, 6], [6, 16], None]
    length = report["window"]["length_ms"]
    assert 5 < length <= 100  # the middle 100 ms, or the whole run if shorter
    for lane in report["lanes"]:
        intervals = lane["intervals"]
        assert intervals and lane["intervals_dropped"] == 0, lane["lane"]
        assert all(kind in ("busy", "transport", "idle") and start <= end for kind, start, end in intervals)
        assert all(end <= start for (_, _, end), (_, start, _) in zip(intervals, intervals[1:])), lane["lane"]
        assert intervals[0][1] == 0 and intervals[-1][2] == pytest.approx(length, abs=1e-3)  # the whole window
        assert sum(lane["shares"].values()) == pytest.approx(1, abs=0.01), lane
        assert lane["shares"]["busy"] > 0, lane["lane"]
        assert set(lane["meaning"]) == {"busy", "transport", "idle"}
    assert set(report["stages_busy_at_once"]) == {"0", "1", "2"}
    assert sum(report["stages_busy_at_once"].values()) == pytest.approx(1, abs=0.01)
    results = json.loads((tmp_path / "results.json").read_text())  # the timed runs as without --timeline
    assert results["methods"]["hispec-pp2"]["identical_to_ar"] and "pipeline" in results["methods"]["hispec-pp2"]


def test_a_timeline_needs_a_pipeline():
    with pytest.raises(SystemExit, match="--timeline draws the stages of a pipeline"):
        speed.main(["--methods", "ar,hispec", "--timeline", "--out", "/nonexistent"])


def test_a_stage_count_a_method_cannot_take_is_refused():
    with pytest.raises(SystemExit, match="--pipeline-stages: hispec: 12 stages: between 1 and 11"):
        speed.main(["--methods", "ar,hispec", "--pipeline-stages", "12", "--out", "/nonexistent"])
