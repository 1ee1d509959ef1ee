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


def test_a_stage_count_a_method_cannot_take_is_refused():
    with pytest.raises(SystemExit, match="--pipeline-stages: hispec: 12 stages: between 1 and 11"):
        speed.main(["--methods", "ar,hispec", "--pipeline-stages", "12", "--out", "/nonexistent"])
