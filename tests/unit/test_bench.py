"""`hispec bench` and `hispec tune` on a tiny checkpoint: real runs, small sizes."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from hispec.bench import speed, tune
from hispec.bench.costmodel import CostTable
from hispec.model import load_model
from hispec.engine import EngineConfig, SpecEngine
from hispec.speculation import Hierarchy, Request
from hispec.engine import ForwardShape
from hispec.speculation.hierarchy import TUNED_CONFIG_NAME, load_policy, resolve_hierarchy
from tests.unit.spec_helpers import tiny_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny 8-layer checkpoint with a tokenizer and a prompts file, like the bundled model's."""
    from transformers import AutoTokenizer

    from hispec.models import DEFAULT_MODEL

    directory = tmp_path_factory.mktemp("tiny8")
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    tiny_model(directory, num_layers=8, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    tokenizer.save_pretrained(directory)
    prompts = ["def f(x):\n", "import os\n", "class A:\n", "x = [1, 2", "for i in range(", "# a comment\n"]
    (directory / "heldout_prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return directory


def test_engine_logs_every_forward_and_the_cost_model_prices_it(checkpoint):
    model = load_model(checkpoint)
    engine = SpecEngine(model, Hierarchy(8, (1, 3), (2, 3)), EngineConfig(max_batch_size=2))
    engine.generate([Request([5, 6, 7], 12, stop_token_ids=()), Request([9], 12, stop_token_ids=())])
    log = engine.forward_log
    assert sum(c for s, c in log.items() if s.prefill) >= 1
    # layers run, summed over the log, equal the per-sequence layer-forward stats at batch 1 ...
    costs = CostTable()
    with costs.recording(model):
        single = SpecEngine(model, Hierarchy(8, (1, 3), (2, 3)), EngineConfig(max_batch_size=1))
        (result,) = single.generate([Request([5, 6, 7], 12, stop_token_ids=())])
    assert not {"plan", "forward_layers", "exit_logits"} & set(vars(model))  # the timers came off
    assert sum(s.layers * c for s, c in single.forward_log.items()) == result.stats.layer_forwards
    seconds = costs.price(single.forward_log)
    assert seconds > 0
    # ... and pricing is additive in the log
    doubled = Counter({k: 2 * v for k, v in single.forward_log.items()})
    assert costs.price(doubled) == pytest.approx(2 * seconds)
    assert all(costs.forward_seconds(shape) > 0 for shape in single.forward_log)
    with pytest.raises(KeyError, match="no timings"):
        costs.forward_seconds(ForwardShape(8, 3, 7, 0))


def test_a_run_priced_with_its_own_timings_is_its_model_time(checkpoint):
    """`since(mark)` keeps one run's samples: pricing that run's log with them gives exactly the
    summed time of its plan / forward / head calls, and an earlier run's samples do not leak in."""
    model = load_model(checkpoint)
    costs = CostTable()
    hierarchy = Hierarchy(8, (1, 3), (2, 3))
    with costs.recording(model):
        SpecEngine(model, hierarchy, EngineConfig(max_batch_size=1)).generate([Request([4, 2], 8, stop_token_ids=())])
        mark = costs.mark()
        engine = SpecEngine(model, hierarchy, EngineConfig(max_batch_size=1))
        engine.generate([Request([5, 6, 7], 12, stop_token_ids=())])
    run = costs.since(mark)
    recorded = sum(sum(v) for table in (run.plan_samples, run.forward_samples, run.head_samples) for v in table.values())
    assert run.price(engine.forward_log) == pytest.approx(recorded)
    assert sum(len(v) for v in run.forward_samples.values()) == sum(engine.forward_log.values())
    assert sum(len(v) for v in costs.forward_samples.values()) > sum(engine.forward_log.values())


def test_tune_writes_a_config_that_generate_uses(checkpoint, tmp_path):
    assert tune.main(["--model", str(checkpoint), "--num-prompts", "2", "--skip-prompts", "0",
                      "--max-new-tokens", "8", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "tune_results.json").read_text())
    assert {r["method"] for r in report["candidates"]} == {"layerskip", "hispec"}
    assert (tmp_path / "hispec_heatmap.png").stat().st_size > 0 and (tmp_path / "layerskip_sweep.png").stat().st_size > 0
    config = json.loads((checkpoint / TUNED_CONFIG_NAME).read_text())
    winner = config["methods"]["hispec"]
    assert winner["predicted_tokens_per_s"] == max(
        r["predicted_tokens_per_s"] for r in report["candidates"] if r["method"] == "hispec")
    assert resolve_hierarchy("hispec", 8, checkpoint) == Hierarchy(8, tuple(winner["exits"]), tuple(winner["budgets"]))
    policy = load_policy(checkpoint, 8)  # the batch-size rules, as the engine reads them
    assert [b for b, _ in policy.rules][-1] is None and config["by_batch_size"] == report["by_batch_size"]
    assert set(report["batch_sizes"]) == {"1", "2", "4", "8", "16"}


def test_bench_writes_results_and_plots(checkpoint, tmp_path):
    assert speed.main(["--model", str(checkpoint), "--num-prompts", "3", "--max-new-tokens", "10", "--repeats", "2",
                       "--batch-sizes", "1,2", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]) == {"ar", "layerskip", "hispec", "hf", "hf-early-exit"}
    for name, entry in results["methods"].items():
        assert entry["identical_to_ar"], name
        assert entry["tokens_per_s"] > 0 and len(entry["seconds"]) == 2
    for name in ("layerskip", "hispec"):
        assert 0 < results["methods"][name]["measured_over_predicted"] and results["methods"][name]["acceptance"]
    assert set(results["batch_sizes"]) == {"1", "2"} and all(
        e["identical_to_ar"] for entry in results["batch_sizes"].values() for e in entry.values())
    assert set(results["crossover_batch_size"]) == {"layerskip", "hispec"}
    sweep = results["hf_early_exit_sweep"]["tokens_per_s_by_exit"]  # transformers' LayerSkip at its best exit
    assert results["methods"]["hf-early-exit"]["hierarchy"] == f"assistant_early_exit={max(sweep, key=sweep.get)}"
    for png in ("tokens_per_s.png", "acceptance.png", "throughput_vs_batch.png"):
        assert (tmp_path / png).stat().st_size > 1000
