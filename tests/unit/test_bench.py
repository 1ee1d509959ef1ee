"""`hispec bench` and `hispec tune` on a tiny checkpoint: real runs, small sizes; the cost model
with tables built by hand, and its separately timed table on the tiny model."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from hispec.bench import speed, tune
from hispec.bench.cost_table import CostTable, TimedOn, timed_cost_table
from hispec.bench.costmodel import predicted_seconds, predicted_tokens_per_s, ranks, spearman
from hispec.bench.model_time import ModelTimeRecorder
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


def test_engine_logs_every_forward_and_the_recorder_prices_it(checkpoint):
    model = load_model(checkpoint)
    engine = SpecEngine(model, Hierarchy(8, (1, 3), (2, 3)), EngineConfig(max_batch_size=2))
    engine.generate([Request([5, 6, 7], 12, stop_token_ids=()), Request([9], 12, stop_token_ids=())])
    log = engine.forward_log
    assert sum(c for s, c in log.items() if s.prefill) >= 1
    # layers run, summed over the log, equal the per-sequence layer-forward stats at batch 1 ...
    costs = ModelTimeRecorder()
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
    costs = ModelTimeRecorder()
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


TIMED_ON = TimedOn(machine="test", logical_cpus=2, threads=1, model="tiny", layers=8, hidden_size=64,
                   dtype="float32", native_layers=False, context=40)


def hand_made_table() -> CostTable:
    """Medians: a 2-layer one-token forward 1 ms, 6 layers x 3 tokens 4 ms, an 8-layer prefill of
    5 tokens 10 ms; the head 0.5 ms on one row, 0.8 ms on three, 0.2 ms on one row of a 100-token
    vocabulary."""
    table = CostTable(TIMED_ON)
    table.forward_samples = {(2, 1, 1, False): [0.0011, 0.0010, 0.0090], (6, 1, 3, False): [0.004],
                             (8, 1, 5, True): [0.010, 0.011, 0.009]}
    table.head_samples = {(1, 0): [0.0005, 0.0004, 0.0006], (3, 0): [0.0008], (1, 100): [0.0002]}
    return table


def test_the_cost_model_prices_a_log_with_the_table_it_is_given():
    table = hand_made_table()
    draft, verify = ForwardShape(2, 1, 1, 1), ForwardShape(6, 1, 3, 3)
    prefill, catch_up = ForwardShape(8, 1, 5, 1, prefill=True), ForwardShape(2, 1, 1, 0)
    assert table.seconds(draft) == pytest.approx(0.0011 + 0.0005)  # medians: the 9 ms outlier does not count
    assert table.seconds(catch_up) == pytest.approx(0.0011)  # no head rows, no head
    assert table.seconds(ForwardShape(2, 1, 1, 1, head_vocab=100)) == pytest.approx(0.0011 + 0.0002)
    # a round of 3 drafts and one 3-token verification, 10 rounds after a prefill: 31 tokens committed
    log = Counter({prefill: 1, draft: 30, verify: 10})
    seconds = 0.0105 + 30 * 0.0016 + 10 * 0.0048
    assert predicted_seconds(table, log) == pytest.approx(seconds)
    assert predicted_tokens_per_s(table, log, 31) == round(31 / seconds, 2)
    # twice the drafts accepted per round: half the rounds for the same tokens
    fewer_rounds = Counter({prefill: 1, draft: 15, verify: 5})
    assert predicted_seconds(table, fewer_rounds) == pytest.approx(0.0105 + 15 * 0.0016 + 5 * 0.0048)
    with pytest.raises(KeyError, match="no timings for forwards"):
        table.seconds(ForwardShape(4, 1, 1, 1))
    with pytest.raises(KeyError, match="exit head on 2 rows"):
        table.seconds(ForwardShape(6, 1, 3, 2))
    again = CostTable.from_dict(json.loads(json.dumps(table.to_dict())))  # the cached form keeps every sample
    assert again == table and again.price(log) == pytest.approx(seconds)


def test_spearman_on_known_rankings():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [9, 7, 5, 1]) == pytest.approx(-1.0)
    assert spearman([3.0, 1.0, 2.0], [300, 100, 200]) == pytest.approx(1.0)  # only the order counts
    assert ranks([5, 6, 7, 8, 7]) == [1, 2, 3.5, 5, 3.5]  # ties share the mean of their ranks
    # ranks y = 1, 2, 3.5, 5, 3.5: cov 8, variances 10 and 9.5
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / (10 * 9.5) ** 0.5)
    # d = rank differences 1, -1, 1, -1, 0: 1 - 6 * 4 / (5 * 24) without ties
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(1 - 6 * 4 / 120)
    assert spearman([1], [2]) is None and spearman([1, 2, 3], [4, 4, 4]) is None
    with pytest.raises(ValueError, match="pairs"):
        spearman([1, 2], [1])


def test_identical_to_ar_compares_every_repetition():
    reference = [[1, 2, 3], [4, 5]]
    same = speed.compare_with_ar([reference, [list(t) for t in reference]], reference)
    assert same == {"identical_to_ar": True, "repetitions_compared": 2, "mismatches": []}
    first_differs = speed.compare_with_ar([[[1, 2, 9], [4, 5]], reference, reference], reference)
    assert first_differs == {"identical_to_ar": False, "repetitions_compared": 3,
                             "mismatches": [{"repetition": 0, "prompts": [0]}]}
    assert speed.compare_with_ar([reference, [[1, 2, 3]]], reference)["mismatches"] == [{"repetition": 1, "prompts": [0, 1]}]


def test_the_cost_table_is_timed_apart_and_cached_with_its_setup(checkpoint, tmp_path):
    """Real timings on the tiny model: every part of every shape asked for gets >= 3 samples;
    a second call on the same setup reuses the cache (no new timing), a new shape adds only
    itself, and a table timed with another thread count is not reused."""
    model = load_model(checkpoint)
    engine = SpecEngine(model, Hierarchy(8, (1, 3), (2, 3)), EngineConfig(max_batch_size=2))
    engine.generate([Request([5, 6, 7], 10, stop_token_ids=()), Request([9, 4], 10, stop_token_ids=())])
    shapes = set(engine.forward_log)
    path = tmp_path / "cost_table.json"
    table = timed_cost_table(path, model, "tiny8", 20, shapes, rounds=3)
    assert table.timed_on.threads == torch.get_num_threads() and table.timed_on.context == 20
    assert all(len(v) >= 3 for v in (*table.forward_samples.values(), *table.head_samples.values()))
    assert predicted_seconds(table, engine.forward_log) > 0
    cached = path.read_text()
    reused = timed_cost_table(path, model, "tiny8", 20, shapes, rounds=3)
    assert reused.to_dict() == table.to_dict() and path.read_text() == cached
    wider = ForwardShape(8, 2, 7, 2)
    grown = timed_cost_table(path, model, "tiny8", 20, shapes | {wider}, rounds=3)
    assert grown.seconds(wider) > 0 and all(grown.forward_samples[k] == v for k, v in reused.forward_samples.items())
    stale = json.loads(path.read_text())
    stale["timed_on"]["threads"] += 1
    path.write_text(json.dumps(stale))
    retimed = timed_cost_table(path, model, "tiny8", 20, shapes, rounds=3)
    assert retimed.timed_on.threads == torch.get_num_threads() and (8, 2, 7, False) not in retimed.forward_samples


def test_tune_writes_a_config_that_generate_uses(checkpoint, tmp_path):
    assert tune.main(["--model", str(checkpoint), "--num-prompts", "2", "--skip-prompts", "0",
                      "--max-new-tokens", "8", "--threads", str(torch.get_num_threads()), "--out", str(tmp_path)]) == 0
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
    assert all(e["predicted_tokens_per_s"] > 0 for entry in report["batch_sizes"].values() for e in entry.values())
    # how well the predicted ranking matches the measured one, over every candidate
    ranking = report["rank_correlation"]
    assert ranking["candidates"] == len(report["candidates"]) and -1 <= ranking["spearman"] <= 1
    assert config["rank_correlation"] == ranking
    assert report["cost_table"]["timed_on"]["model"] == str(checkpoint) and (tmp_path / "cost_table.json").exists()
    assert (tmp_path / "predicted_vs_measured.png").stat().st_size > 0


def test_bench_writes_results_and_plots(checkpoint, tmp_path):
    assert speed.main(["--model", str(checkpoint), "--num-prompts", "3", "--max-new-tokens", "10", "--repeats", "2",
                       "--batch-sizes", "1,2", "--threads", str(torch.get_num_threads()), "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]) == {"ar", "layerskip", "hispec", "hf", "hf-early-exit"}
    for name, entry in results["methods"].items():  # every repetition compared with ar's output
        assert entry["identical_to_ar"] and entry["repetitions_compared"] == 2 and entry["mismatches"] == [], name
        assert entry["tokens_per_s"] > 0 and len(entry["seconds"]) == 2
    for name in ("ar", "layerskip", "hispec"):  # predicted (table timed apart) next to measured
        entry = results["methods"][name]
        assert entry["predicted_tokens_per_s"] > 0 and (entry["acceptance"] or name == "ar")
        assert entry["measured_over_predicted"] == pytest.approx(entry["tokens_per_s"] / entry["predicted_tokens_per_s"],
                                                                 abs=1e-3)
        assert 0 < entry["model_time_share"] <= 1.05 and len(entry["model_time_share_runs"]) == 2
    assert "predicted_tokens_per_s" not in results["methods"]["hf"]
    table = json.loads((tmp_path / "cost_table.json").read_text())
    assert results["cost_table"] == table and table["timed_on"]["threads"] == results["config"]["threads"]
    assert set(results["batch_sizes"]) == {"1", "2"} and all(
        e["identical_to_ar"] and e["repetitions_compared"] == 2 and e["predicted_tokens_per_s"] > 0
        for entry in results["batch_sizes"].values() for e in entry.values())
    assert set(results["crossover_batch_size"]) == {"layerskip", "hispec"}
    sweep = results["hf_early_exit_sweep"]["tokens_per_s_by_exit"]  # transformers' LayerSkip at its best exit
    assert results["methods"]["hf-early-exit"]["hierarchy"] == f"assistant_early_exit={max(sweep, key=sweep.get)}"
    for png in ("tokens_per_s.png", "acceptance.png", "throughput_vs_batch.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_model_time_prices_a_later_prompt_chunk_as_recorded():
    """A prompt chunk after the first starts mid-prompt: the recorder saw a forward not at position 0,
    the scheduler's log says prefill; pricing finds it (it raised KeyError on batch-8 runs)."""
    from hispec.bench.model_time import ModelTimeRecorder
    from hispec.engine import ForwardShape

    recorder = ModelTimeRecorder()
    recorder.plan_samples[(2, 41, False)] = [0.001]
    recorder.forward_samples[(16, 2, 41, False)] = [0.010]
    assert recorder.forward_seconds(ForwardShape(16, 2, 41, 0, prefill=True)) == pytest.approx(0.011)
    with pytest.raises(KeyError):
        recorder.forward_seconds(ForwardShape(16, 3, 41, 0, prefill=True))
