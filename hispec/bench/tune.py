"""`hispec tune`: sweep exits and budgets for LayerSkip and HiSpec; store the winners next to the checkpoint.

    hispec tune                                   # bundled model, writes its hispec_config.json
    hispec tune --model DIR --prompts p.jsonl --out runs/tune

Every candidate hierarchy decodes the same sample prompts (greedy, batch 1; by default held-out
prompts the benchmark does not use). Candidates are ranked by the cost model: the forwards each
one ran (what its acceptance decided), priced with a cost table timed separately after the sweep
(hispec.bench.cost_table; OUT/cost_table.json, reused on the same machine and threads). That
ranking resists this machine's timing noise; each candidate's measured speed (one run) is kept
beside it, and how well the predicted ranking matches the measured one is reported as Spearman's
rank correlation over the candidates. Writes a heatmap over (draft exit, verifier exit), the
LayerSkip sweep, predicted against measured speed, all numbers as JSON, and `hispec_config.json`,
which `generate`, `bench` and the server use by default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from hispec.bench import plots
from hispec.bench.cost_table import CostTable, add_shapes, timed_cost_table
from hispec.bench.costmodel import predicted_tokens_per_s, spearman
from hispec.bench.prompts import PROMPTS_NAME, read_prompts_jsonl
from hispec.model import load_model
from hispec.models import DEFAULT_MODEL
from hispec.engine import EngineConfig, SpecEngine
from hispec.speculation import Hierarchy, Request
from hispec.speculation.hierarchy import TUNED_CONFIG_NAME

HISPEC_BUDGETS = [(1, 3), (2, 4), (3, 4), (2, 6), (3, 6)]
LAYERSKIP_BUDGETS = [2, 3, 4, 5, 6, 8]
DEEP_BUDGETS = [(1, 2, 4), (2, 2, 4), (2, 3, 4)]


def candidate_exits(num_layers: int) -> list[int]:
    """Exits worth trying: the first quarter in steps of 1, then coarser up to half depth."""
    quarter, half = max(1, num_layers // 4), max(2, num_layers // 2)
    return sorted({*range(1, quarter + 1), *range(quarter, half + 1, max(1, num_layers // 8))} - {num_layers})


def candidates(num_layers: int) -> list[Hierarchy]:
    exits = candidate_exits(num_layers)
    out = [Hierarchy(num_layers, (e,), (n,)) for e in exits for n in LAYERSKIP_BUDGETS]
    out += [Hierarchy(num_layers, (e0, e1), b) for e0 in exits for e1 in exits if e0 < e1 and e0 <= num_layers // 4
            for b in HISPEC_BUDGETS]
    quarter = max(3, num_layers // 4)
    deep = {(1, 2, quarter), (1, quarter // 2 + 1, quarter), (2, quarter, num_layers // 2)}
    out += [Hierarchy(num_layers, e, b) for e in sorted(deep) if len(set(e)) == 3 and e[-1] < num_layers
            for b in DEEP_BUDGETS]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hispec tune", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--prompts", type=Path, help="JSONL of {\"prompt\": ...} (default: the model's held-out prompts)")
    parser.add_argument("--skip-prompts", type=int, default=32, help="skip this many first prompts (the benchmark's)")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="where plots and tune_results.json go (default: MODEL/tuning)")
    parser.add_argument("--cost-table", type=Path, help="the cost model's table: reused if it was timed on this "
                                                        "setup, else (re)timed and written (default: OUT/cost_table.json)")
    parser.add_argument("--no-write-config", action="store_true", help=f"do not write MODEL/{TUNED_CONFIG_NAME}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    out_dir = args.out or args.model / "tuning"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = load_model(args.model, dtype="float32")
    L = model.config.num_layers
    all_prompts = read_prompts_jsonl(args.prompts or args.model / PROMPTS_NAME)
    prompts = all_prompts[args.skip_prompts : args.skip_prompts + args.num_prompts] or all_prompts[: args.num_prompts]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]

    def run(hierarchy: Hierarchy) -> dict:
        engine = SpecEngine(model, hierarchy, EngineConfig(max_batch_size=1))
        started = time.perf_counter()
        results = engine.generate([Request(ids, args.max_new_tokens) for ids in prompt_ids])
        seconds = time.perf_counter() - started
        tokens = sum(len(r.token_ids) for r in results)
        stats = engine.total_stats.to_dict(hierarchy)
        return {"exits": list(hierarchy.exits), "budgets": list(hierarchy.budgets), "method": hierarchy.method,
                "log": engine.forward_log, "new_tokens": tokens,
                "measured_tokens_per_s": round(tokens / seconds, 2),
                "tokens_per_target_pass": stats["tokens_per_target_pass"],
                "acceptance": [lv["acceptance_rate"] for lv in stats["levels"][1:]],
                "outputs": [r.token_ids for r in results]}

    reference = run(Hierarchy(L))
    rows = [dict(reference, outputs=None)]
    for hierarchy in tqdm(candidates(L), desc="tune", unit="config"):
        row = run(hierarchy)
        if row.pop("outputs") != reference["outputs"]:
            raise RuntimeError(f"{hierarchy.describe()} changed the greedy output: an engine bug")
        rows.append(row)
    rows[0].pop("outputs")
    # Timed after the sweep, apart from its runs: every forward shape they ran (the policy's
    # batch sizes add theirs to the same table).
    context = round(statistics.fmean(map(len, prompt_ids)) + args.max_new_tokens / 2)
    cost_path = args.cost_table or out_dir / "cost_table.json"
    table = timed_cost_table(cost_path, model, str(args.model), context, {s for r in rows for s in r["log"]})
    for row in rows:
        row["predicted_tokens_per_s"] = predicted_tokens_per_s(table, row.pop("log"), row.pop("new_tokens"))
    swept = [dict(r) for r in rows[1:]]  # before the winners' reruns replace their one-run measurement
    ranking = rank_correlation(swept)

    def best(method: str) -> dict:
        return max((r for r in rows if r["method"] == method), key=lambda r: r["predicted_tokens_per_s"])

    winners = {m: best(m) for m in ("layerskip", "hispec")}
    for name, row in winners.items():  # the winners' measured speed, a few repeats
        hierarchy = Hierarchy(L, tuple(row["exits"]), tuple(row["budgets"]))
        row["measured_tokens_per_s"] = statistics.median(run(hierarchy)["measured_tokens_per_s"] for _ in range(3))
    rows[0]["measured_tokens_per_s"] = statistics.median(run(Hierarchy(L))["measured_tokens_per_s"] for _ in range(3))
    by_batch, policy = batch_size_policy(model, table, winners, args, all_prompts, cost_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"model": str(args.model), "num_prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
              "ar": rows[0], "winners": winners, "rank_correlation": ranking, "batch_sizes": by_batch,
              "by_batch_size": policy, "candidates": rows[1:], "cost_table": table.to_dict()}
    (out_dir / "tune_results.json").write_text(json.dumps(report, indent=1) + "\n")
    draw(rows, L, out_dir)
    plots.predicted_vs_measured(swept, ranking["spearman"], out_dir / "predicted_vs_measured.png")
    if not args.no_write_config:
        config = {"methods": {m: {"exits": r["exits"], "budgets": r["budgets"],
                                  "predicted_tokens_per_s": r["predicted_tokens_per_s"]} for m, r in winners.items()},
                  "ar_predicted_tokens_per_s": rows[0]["predicted_tokens_per_s"],
                  "by_batch_size": policy,
                  "crossover_batch_size": crossover(by_batch),
                  "rank_correlation": ranking,
                  "tuned_with": f"hispec tune ({len(prompts)} held-out prompts x {args.max_new_tokens} tokens, "
                                f"greedy, batch 1, fp32, ranked by the cost model)"}
        (args.model / TUNED_CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n")
    print(f"ar: {rows[0]['predicted_tokens_per_s']} tok/s predicted, {rows[0]['measured_tokens_per_s']} measured")
    for name, row in winners.items():
        print(f"{name}: exits {row['exits']} budgets {row['budgets']}: {row['predicted_tokens_per_s']} tok/s predicted, "
              f"{row['measured_tokens_per_s']} measured, acceptance {row['acceptance']}")
    print(f"predicted vs measured ranking over {ranking['candidates']} candidates: Spearman {ranking['spearman']}")
    print("by batch size:", json.dumps(policy), "crossover:", json.dumps(crossover(by_batch)))
    print(f"wrote {out_dir}/tune_results.json, cost_table.json, hispec_heatmap.png, layerskip_sweep.png, "
          "predicted_vs_measured.png")
    return 0


POLICY_BATCH_SIZES = (1, 2, 4, 8, 16)


def rank_correlation(rows: list[dict]) -> dict:
    """How well the cost model ranks `rows` (candidates with predicted and measured tokens/s):
    Spearman's rank correlation, and the candidates it was computed over."""
    pairs = [(r["predicted_tokens_per_s"], r["measured_tokens_per_s"]) for r in rows
             if r["predicted_tokens_per_s"] is not None]
    rho = spearman([p for p, _ in pairs], [m for _, m in pairs])
    return {"spearman": None if rho is None else round(rho, 3), "candidates": len(pairs),
            "measured": "one run per candidate, batch 1"}


def batch_size_policy(model, table: CostTable, winners: dict, args, all_prompts: list[str],
                      cost_path: Path) -> tuple[dict, list[dict]]:
    """Predicted tokens/s of ar and the two winners at each batch size (shapes the table lacks
    are timed after the runs), and the policy that picks the fastest per size:
    [{"max_batch_size": B or None, "method": name}, ...]."""
    L = model.config.num_layers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = (all_prompts[args.skip_prompts :] + all_prompts)[: max(POLICY_BATCH_SIZES)]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    methods = {"ar": Hierarchy(L)} | {m: Hierarchy(L, tuple(r["exits"]), tuple(r["budgets"])) for m, r in winners.items()}
    by_batch: dict[str, dict] = {}
    logs: dict[tuple[str, str], tuple] = {}
    for size in tqdm(POLICY_BATCH_SIZES, desc="batch sizes", unit="size"):
        requests = prompt_ids[: max(size, 2)]
        by_batch[str(size)] = {}
        for name, hierarchy in methods.items():
            engine = SpecEngine(model, hierarchy, EngineConfig(max_batch_size=size))
            started = time.perf_counter()
            results = engine.generate([Request(ids, args.max_new_tokens) for ids in requests])
            seconds = time.perf_counter() - started
            tokens = sum(len(r.token_ids) for r in results)
            logs[(str(size), name)] = (engine.forward_log, tokens)
            by_batch[str(size)][name] = {"measured_tokens_per_s": round(tokens / seconds, 2)}
    add_shapes(table, model, {s for log, _ in logs.values() for s in log}, cost_path)
    for (size, name), (log, tokens) in logs.items():
        by_batch[size][name] = {"predicted_tokens_per_s": predicted_tokens_per_s(table, log, tokens)} | by_batch[size][name]
    best = [(size, max(by_batch[str(size)], key=lambda m: by_batch[str(size)][m]["predicted_tokens_per_s"]))
            for size in POLICY_BATCH_SIZES]
    policy: list[dict] = []
    for size, method in best:
        if policy and policy[-1]["method"] == method:
            policy[-1]["max_batch_size"] = size
        else:
            policy.append({"max_batch_size": size, "method": method})
    policy[-1]["max_batch_size"] = None
    return by_batch, policy


def crossover(by_batch: dict) -> dict:
    """Per speculative method: the smallest batch size where plain decoding is predicted at least as fast."""
    return {m: next((int(b) for b, e in by_batch.items()
                     if e["ar"]["predicted_tokens_per_s"] >= e[m]["predicted_tokens_per_s"]), None)
            for m in ("layerskip", "hispec")}


def draw(rows: list[dict], num_layers: int, out_dir: Path) -> None:
    pairs: dict[tuple[int, int], float] = {}
    for r in rows:
        if r["method"] == "hispec" and len(r["exits"]) == 2:
            key = tuple(r["exits"])
            pairs[key] = max(pairs.get(key, 0.0), r["predicted_tokens_per_s"])
    xs = sorted({x for x, _ in pairs})
    ys = sorted({y for _, y in pairs})
    plots.heatmap(pairs, xs, ys, out_dir / "hispec_heatmap.png",
                  f"HiSpec, best budgets per exit pair: predicted tokens/s (ar: {rows[0]['predicted_tokens_per_s']:.0f})")
    sweep = {(r["exits"][0], r["budgets"][0]): r["predicted_tokens_per_s"] for r in rows if r["method"] == "layerskip"}
    exits = sorted({e for e, _ in sweep})
    budgets = sorted({b for _, b in sweep})
    grid = {(b, e): v for (e, b), v in sweep.items()}
    plots.heatmap(grid, budgets, exits, out_dir / "layerskip_sweep.png", "LayerSkip: predicted tokens/s",
                  xlabel="draft tokens per round n0", ylabel="draft exit layer e0")


if __name__ == "__main__":
    raise SystemExit(main())
