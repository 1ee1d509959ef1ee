"""`hispec bench`: every decoding method on the same prompts, side by side, in one run.

    hispec bench --out docs/bench                  # bundled model, its held-out prompts
    hispec bench --prompts p.jsonl --methods ar,hispec --batch-sizes 1,8 --repeats 5 --out runs/b

Greedy. Repetitions are interleaved (A B C A B C ...) and medians reported, because this machine
is noisy. Every method's output is checked against our autoregressive decoding. Our methods are
also priced by the cost model (measured / predicted = how close the engine runs to what the
algorithm needs with this runtime). Writes OUT/results.json and PNG plots.
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
from hispec.bench.costmodel import CostTable
from hispec.bench.prompts import PROMPTS_NAME, read_prompts_jsonl
from hispec.model import load_model
from hispec.models import DEFAULT_MODEL
from hispec.engine import EngineConfig, SpecEngine
from hispec.speculation import Request, RequestStats, resolve_hierarchy

OURS = ("ar", "layerskip", "hispec")
HF = ("hf", "hf-early-exit")


def csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hispec bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--prompts", type=Path, help="JSONL of {\"prompt\": ...} (default: the model's held-out prompts)")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", type=csv, default=list(OURS + HF))
    parser.add_argument("--batch-sizes", type=lambda t: [int(x) for x in csv(t)], default=[1, 4, 8, 16])
    parser.add_argument("--hf-exit", type=int, help="assistant_early_exit for hf-early-exit (default: the fastest "
                                                    "of a quick sweep over exits)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--draft-vocab", type=int, help="proposals below the target score tokens [0, N) only "
                                                        "(EngineConfig.draft_vocab; default: the full head)")
    parser.add_argument("--out", type=Path, required=True)
    return parser


def read_prompts(path: Path, count: int) -> list[str]:
    return read_prompts_jsonl(path)[:count]


class OurMethod:
    def __init__(self, model, hierarchy, draft_vocab=None):
        self.model, self.hierarchy, self.draft_vocab = model, hierarchy, draft_vocab

    def run(self, prompt_ids, max_new, batch_size):
        config = EngineConfig(max_batch_size=batch_size, draft_vocab=self.draft_vocab)
        engine = SpecEngine(self.model, self.hierarchy, config)
        started = time.perf_counter()
        results = engine.generate([Request(ids, max_new) for ids in prompt_ids])
        return time.perf_counter() - started, [r.token_ids for r in results], engine


class HFMethod:
    def __init__(self, hf_model, eos, pad, early_exit=None):
        self.hf, self.eos, self.pad, self.early_exit = hf_model, eos, pad, early_exit

    @torch.inference_mode()
    def run(self, prompt_ids, max_new, batch_size=1):
        extra = {"assistant_early_exit": self.early_exit} if self.early_exit else {}
        outputs, started = [], time.perf_counter()
        for ids in prompt_ids:  # batch 1: assistant_early_exit supports nothing else
            out = self.hf.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                                   eos_token_id=self.eos, pad_token_id=self.pad, **extra)
            outputs.append(out[0, len(ids):].tolist())
        return time.perf_counter() - started, outputs, None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = set(args.methods) - set(OURS + HF)
    if unknown or "ar" not in args.methods:
        raise SystemExit(f"--methods must include ar and come from {OURS + HF}; got {args.methods}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = load_model(args.model, dtype="float32")
    L = model.config.num_layers
    prompts = read_prompts(args.prompts or args.model / PROMPTS_NAME, args.num_prompts)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    eos = list(model.config.eos_token_ids)
    hierarchies = {m: resolve_hierarchy(m, L, args.model) for m in OURS if m in args.methods}
    methods = {m: OurMethod(model, h, args.draft_vocab) for m, h in hierarchies.items()}
    if set(HF) & set(args.methods):
        hf_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        if "hf" in args.methods:
            methods["hf"] = HFMethod(hf_model, eos, tokenizer.pad_token_id)
        if "hf-early-exit" in args.methods:
            hf_exit, hf_sweep = args.hf_exit, None
            if hf_exit is None:
                hf_exit, hf_sweep = best_hf_exit(hf_model, eos, tokenizer.pad_token_id, prompt_ids, L)
            methods["hf-early-exit"] = HFMethod(hf_model, eos, tokenizer.pad_token_id, early_exit=hf_exit)
    costs = CostTable()

    for method in methods.values():  # warm-up: first calls pay one-time costs
        method.run(prompt_ids[:2], 16, 1)
    batch_runs = [(b, m) for b in args.batch_sizes if b > 1 for m in hierarchies]
    progress = tqdm(total=args.repeats * (len(methods) + len(batch_runs)), desc="bench", unit="run")
    times: dict[tuple[str, int], list[float]] = {}
    outputs: dict[tuple[str, int], list[list[int]]] = {}
    engines: dict[tuple[str, int], SpecEngine] = {}
    efficiency: dict[tuple[str, int], list[float]] = {}  # per run: its model work / its wall time
    with costs.recording(model):  # per-shape costs of our forwards, timed where they run
        for repeat, name, batch in [(r, m, b) for r in range(args.repeats)  # interleaved: A B C A B C ...
                                    for m, b in [(m, 1) for m in methods] + [(m, b) for b, m in batch_runs]]:
            progress.set_postfix_str(f"{name} batch {batch}")
            mark = costs.mark()
            elapsed, tokens, engine = methods[name].run(prompt_ids, args.max_new_tokens, batch)
            times.setdefault((name, batch), []).append(elapsed)
            outputs[(name, batch)] = tokens
            if engine is not None:
                engines[(name, batch)] = engine
                efficiency.setdefault((name, batch), []).append(costs.since(mark).price(engine.forward_log) / elapsed)
            progress.update()
    progress.close()

    reference = outputs[("ar", 1)]
    new_tokens = sum(len(t) for t in reference)

    def entry(name: str, batch: int) -> dict:
        seconds = statistics.median(times[(name, batch)])
        tokens = sum(len(t) for t in outputs[(name, batch)])
        result = {"tokens_per_s": round(tokens / seconds, 2), "seconds": [round(s, 3) for s in times[(name, batch)]],
                  "new_tokens": tokens, "identical_to_ar": outputs[(name, batch)] == reference}
        engine = engines.get((name, batch))
        if engine is not None:
            hierarchy = hierarchies[name]
            stats = RequestStats.total(hierarchy, [engine.total_stats]).to_dict(hierarchy)
            predicted = costs.price(engine.forward_log)
            result |= {
                "hierarchy": hierarchy.describe(),
                "acceptance": {str(lv["exit"]): lv["acceptance_rate"] for lv in stats["levels"][1:]},
                "tokens_per_target_pass": stats["tokens_per_target_pass"],
                "layer_forwards_per_token": stats["layer_forwards_per_token"],
                "layer_token_passes_per_token": stats["layer_token_passes_per_token"],
                "predicted_tokens_per_s": round(tokens / predicted, 2),
                "measured_over_predicted": round(statistics.median(efficiency[(name, batch)]), 3),
                "measured_over_predicted_runs": [round(e, 3) for e in efficiency[(name, batch)]],
            }
        return result

    results = {
        "config": {"model": str(args.model), "num_prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                   "repeats": args.repeats, "threads": args.threads, "dtype": "float32", "new_tokens": new_tokens,
                   "draft_vocab": args.draft_vocab,
                   "command": "hispec bench " + " ".join(argv if argv is not None else [])},
        "methods": {name: entry(name, 1) for name in methods},
        "batch_sizes": {str(b): {m: entry(m, b) for m in hierarchies} for b in args.batch_sizes if b > 1},
    }
    results["batch_sizes"]["1"] = {m: results["methods"][m] for m in hierarchies}
    results["batch_sizes"] = dict(sorted(results["batch_sizes"].items(), key=lambda kv: int(kv[0])))
    results["speedups"] = speedups(results["methods"])
    results["crossover_batch_size"] = crossover(results["batch_sizes"])
    results["cost_table"] = costs.to_dict()
    if "hf-early-exit" in methods:
        results["methods"]["hf-early-exit"]["hierarchy"] = f"assistant_early_exit={methods['hf-early-exit'].early_exit}"
        results["hf_early_exit_sweep"] = hf_sweep
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plots.tokens_per_second(results, args.out / "tokens_per_s.png")
    plots.acceptance(results, args.out / "acceptance.png")
    plots.throughput_vs_batch(results, args.out / "throughput_vs_batch.png")
    for name, e in results["methods"].items():
        extra = f", model {e['measured_over_predicted']:.2f} of predicted" if "measured_over_predicted" in e else ""
        print(f"{name:14} {e['tokens_per_s']:8.1f} tok/s  identical_to_ar={e['identical_to_ar']}{extra}")
    print(json.dumps(results["speedups"]), "crossover:", json.dumps(results["crossover_batch_size"]))
    print(f"wrote {args.out / 'results.json'} and 3 plots")
    return 0


def best_hf_exit(hf_model, eos, pad, prompt_ids, num_layers: int) -> tuple[int, dict]:
    """transformers' `assistant_early_exit` at its best: the fastest exit on a few prompts
    (tokens/s, median of 2 interleaved rounds)."""
    from hispec.bench.tune import candidate_exits

    sample, times = prompt_ids[:4], {}
    for _ in range(2):
        for exit_layer in candidate_exits(num_layers):
            elapsed, outputs, _ = HFMethod(hf_model, eos, pad, early_exit=exit_layer).run(sample, 48)
            times.setdefault(exit_layer, []).append(sum(len(o) for o in outputs) / elapsed)
    speeds = {e: round(statistics.median(v), 2) for e, v in times.items()}
    return max(speeds, key=speeds.get), {"tokens_per_s_by_exit": speeds, "prompts": len(sample), "max_new_tokens": 48}


def speedups(methods: dict) -> dict:
    def ratio(a: str, b: str) -> float | None:
        return round(methods[a]["tokens_per_s"] / methods[b]["tokens_per_s"], 3) if a in methods and b in methods else None

    return {"hispec/layerskip": ratio("hispec", "layerskip"), "hispec/ar": ratio("hispec", "ar"),
            "hispec/hf-early-exit": ratio("hispec", "hf-early-exit"), "ar/hf": ratio("ar", "hf"),
            "layerskip/ar": ratio("layerskip", "ar")}


def crossover(by_batch: dict) -> dict:
    """Per speculative method: the smallest measured batch size where autoregressive decoding is
    at least as fast (None: speculation wins at every measured size)."""
    out = {}
    for method in ("layerskip", "hispec"):
        sizes = [b for b, entry in by_batch.items() if method in entry and "ar" in entry]
        out[method] = next((int(b) for b in sizes if by_batch[b]["ar"]["tokens_per_s"] >= by_batch[b][method]["tokens_per_s"]), None)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
