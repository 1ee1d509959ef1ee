"""`hispec bench`: every decoding method on the same prompts, side by side, in one run.

    hispec bench --out docs/bench                  # bundled model, its held-out prompts
    hispec bench --prompts p.jsonl --methods ar,hispec --batch-sizes 1,8 --repeats 5 --out runs/b
    hispec bench --pipeline-stages 2 --out runs/pp    # also ar-pp2, layerskip-pp2, hispec-pp2

Greedy. Repetitions are interleaved (A B C A B C ...) and medians reported, because this machine
is noisy. Every repetition of every method is checked against our autoregressive decoding
(`identical_to_ar`, with the repetitions compared and any mismatch). Our methods' speed is also
predicted by the cost model: the forwards their acceptance made them run, priced with a cost table
timed separately after the measured runs (OUT/cost_table.json, reused by later runs on the same
machine and threads); `model_time_share` is the share of each run's wall time spent in the
model's own calls, timed in place. With --pipeline-stages S > 1 each of our methods also
runs on a pipeline of S stage actors (a local Ray instance started for the run; rows
`<method>-pp<S>` beside the others), with each stage's busy / transport / idle time and the bytes
moved per committed token. With --timeline, after the timed runs, one more run of the pipelined
hispec method at batch 1 (and 8, if measured) records every stage's and the driver's busy /
transport / idle intervals, and a window from its middle is drawn: OUT/timeline.png and
OUT/timeline.json (OUT/timeline-batch8.*); the timed runs are not recorded. Writes
OUT/results.json and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from hispec.bench import plots
from hispec.bench.cost_table import CostTable, timed_cost_table
from hispec.bench.costmodel import predicted_tokens_per_s
from hispec.bench.model_time import ModelTimeRecorder
from hispec.bench.prompts import PROMPTS_NAME, read_prompts_jsonl
from hispec.model import compute_dtype, load_model
from hispec.models import DEFAULT_MODEL
from hispec.engine import EngineConfig, SpecEngine
from hispec.engine.plan import StepPlan
from hispec.engine.stage import sends
from hispec.pipeline import stage_timing_report
from hispec.pipeline.messages import StageTimes
from hispec.speculation import Request, RequestStats, resolve_hierarchy
from hispec.speculation.hierarchy import BatchPolicy

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
    parser.add_argument("--speculate-ahead", action=argparse.BooleanOptionalAction, default=EngineConfig.speculate_ahead,
                        help="greedy HiSpec / LayerSkip windows speculated by the first stage on its own "
                             "(EngineConfig.speculate_ahead; default: in pipelines only)")
    parser.add_argument("--pipeline-stages", type=int, default=1, metavar="S",
                        help="also run our methods on S stage actors of a local Ray instance (rows <method>-pp<S>; "
                             "default 1: single process only)")
    parser.add_argument("--timeline", action="store_true",
                        help="with --pipeline-stages S > 1: after the timed runs, record one run of hispec-pp<S> "
                             "(batch 1, and 8 if in --batch-sizes) and draw each stage's and the driver's busy / "
                             "transport / idle intervals over a window from its middle (OUT/timeline.png, .json)")
    parser.add_argument("--timeline-ms", type=float, default=300.0,
                        help="the timeline window's length in ms (default 300; the whole run if shorter)")
    parser.add_argument("--cost-table", type=Path, help="the cost model's table, timed separately: reused if it was "
                                                        "timed on this setup, else (re)timed and written "
                                                        "(default: OUT/cost_table.json)")
    parser.add_argument("--out", type=Path, required=True)
    return parser


def pipelined_name(method: str, stages: int) -> str:
    return f"{method}-pp{stages}"


def base_method(name: str) -> tuple[str, str]:
    """("hispec", "-pp2") for "hispec-pp2", ("hispec", "") for "hispec"."""
    base, sep, stages = name.partition("-pp")
    return base, sep + stages


def read_prompts(path: Path, count: int) -> list[str]:
    return read_prompts_jsonl(path)[:count]


def engine_options(args) -> dict:
    """The EngineConfig fields the command line sets for every engine it times."""
    return {"draft_vocab": args.draft_vocab, "speculate_ahead": args.speculate_ahead}


class OurMethod:
    def __init__(self, model, hierarchy, options: dict):
        self.model, self.hierarchy, self.options = model, hierarchy, options

    def run(self, prompt_ids, max_new, batch_size):
        config = EngineConfig(max_batch_size=batch_size, **self.options)
        engine = SpecEngine(self.model, self.hierarchy, config)
        started = time.perf_counter()
        results = engine.generate([Request(ids, max_new) for ids in prompt_ids])
        return time.perf_counter() - started, [r.token_ids for r in results], engine


@dataclass
class PipelineRun:
    """What one timed run of a pipelined method cost, beside its wall time."""

    seconds: float
    new_tokens: int
    stage_times: list[StageTimes]  # reset before the run, read after it
    plan_bytes: int  # control bytes the driver sent (plans to every stage)
    steps: int  # engine steps (a plan out and a reply back for each stage taking part; StageTimes.steps per stage)
    hops: int  # hidden-row messages between neighbouring stages
    prefill_row_bytes: int  # of the rows those messages carried, the prompts'


class _CountingExecutor:
    """A pipeline's executor, counting the steps it runs and the stage boundaries their forwards
    cross (one hidden-row message each: rows computed below a boundary, or a ring read at it),
    and the bytes of the prompts' rows among them."""

    def __init__(self, executor, bounds: tuple[int, ...], dtype: str) -> None:
        self.executor, self.inner_bounds = executor, bounds[1:-1]
        self.model_config, self.num_slots, self.capacity = executor.model_config, executor.num_slots, executor.capacity
        self.first_stage_layers = executor.first_stage_layers
        self.row_bytes = self.model_config.hidden_size * torch.empty(0, dtype=compute_dtype(dtype, "cpu")).element_size()
        self.steps = self.hops = self.prefill_row_bytes = 0

    def execute(self, plan: StepPlan):
        self.steps += 1
        for forward in plan.forwards:
            crossings = sum(sends(b, forward) for b in self.inner_bounds)  # a stage ending at b hands rows on
            self.hops += crossings
            if forward.prefill:  # rows [B, T, d] per crossing
                self.prefill_row_bytes += crossings * len(forward.feeds) * forward.width * self.row_bytes
        return self.executor.execute(plan)

    def snapshot(self, with_tensors: bool = False):
        return self.executor.snapshot(with_tensors)

    def close(self) -> None:  # the pipeline outlives the engines of single runs
        pass


class PipelinedMethod:
    """One of our methods on a pipeline of stage actors, started once with a KV slot per sequence
    of the largest batch. Each run is a fresh engine on its executor; the stages' counters are
    reset before and read after the timed part (`last_run`)."""

    def __init__(self, pipelined, hierarchy, options: dict):
        self.pipelined, self.hierarchy, self.options = pipelined, hierarchy, options
        self.bounds, self.dtype = pipelined.pipeline.spec.bounds, pipelined.pipeline.spec.dtype
        self.last_run: PipelineRun | None = None

    def run(self, prompt_ids, max_new, batch_size):
        executor = self.pipelined.executor
        counting = _CountingExecutor(executor, self.bounds, self.dtype)
        engine = SpecEngine(counting, self.hierarchy, EngineConfig(max_batch_size=batch_size, **self.options))
        executor.stage_times(reset=True)
        plan_bytes = executor.plan_bytes
        started = time.perf_counter()
        results = engine.generate([Request(ids, max_new) for ids in prompt_ids])
        elapsed = time.perf_counter() - started
        tokens = [r.token_ids for r in results]
        self.last_run = PipelineRun(elapsed, sum(map(len, tokens)), executor.stage_times(),
                                    executor.plan_bytes - plan_bytes, counting.steps, counting.hops, counting.prefill_row_bytes)
        return elapsed, tokens, engine


def start_pipelines(stack: ExitStack, args, hierarchies: dict) -> dict[str, PipelinedMethod]:
    """`<method>-pp<S>` for each of our methods: a pipeline of S stage actors each, all on one local
    Ray instance; `stack` closes them and the instance."""
    from hispec.pipeline.build import PipelinedEngine
    from hispec.pipeline.local import local_ray, stage_cpus

    stages = args.pipeline_stages
    stack.enter_context(local_ray(stage_cpus(stages, len(hierarchies))))  # the pipelines take turns
    config = EngineConfig(max_batch_size=max(args.batch_sizes), **engine_options(args))
    methods = {}
    for name, hierarchy in hierarchies.items():
        pipelined = stack.enter_context(PipelinedEngine.start(args.model, BatchPolicy.fixed(hierarchy), stages, config))
        methods[pipelined_name(name, stages)] = PipelinedMethod(pipelined, hierarchy, engine_options(args))
    return methods


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


@dataclass
class Timings:
    """Every timed run, by (method, batch size), repetitions in order."""

    seconds: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    outputs: dict[tuple[str, int], list[list[list[int]]]] = field(default_factory=dict)  # per run: tokens per prompt
    engines: dict[tuple[str, int], SpecEngine] = field(default_factory=dict)  # ours: the last run's engine
    model_time_share: dict[tuple[str, int], list[float]] = field(default_factory=dict)  # per run: model calls / wall time
    pipeline_runs: dict[tuple[str, int], list[PipelineRun]] = field(default_factory=dict)


def time_interleaved(methods: dict, runs: list[tuple[str, int]], repeats: int, prompt_ids, max_new: int,
                     model, costs: ModelTimeRecorder) -> Timings:
    """`repeats` rounds of `runs` (method, batch size), interleaved: A B C A B C ... Our
    single-process runs' model calls are timed in place as well (their model time share)."""
    for method in methods.values():  # warm-up: first calls pay one-time costs
        method.run(prompt_ids[:2], 16, 1)
    timings = Timings()
    progress = tqdm(total=repeats * len(runs), desc="bench", unit="run")
    with costs.recording(model):  # our forwards' model calls, timed where they run
        for _ in range(repeats):
            for name, batch in runs:
                progress.set_postfix_str(f"{name} batch {batch}")
                mark = costs.mark()
                elapsed, tokens, engine = methods[name].run(prompt_ids, max_new, batch)
                key = (name, batch)
                timings.seconds.setdefault(key, []).append(elapsed)
                timings.outputs.setdefault(key, []).append(tokens)
                if engine is not None:
                    timings.engines[key] = engine
                if isinstance(methods[name], PipelinedMethod):  # its forwards ran in the stage actors
                    timings.pipeline_runs.setdefault(key, []).append(methods[name].last_run)
                elif engine is not None:
                    timings.model_time_share.setdefault(key, []).append(costs.since(mark).price(engine.forward_log) / elapsed)
                progress.update()
    progress.close()
    return timings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = set(args.methods) - set(OURS + HF)
    if unknown or "ar" not in args.methods:
        raise SystemExit(f"--methods must include ar and come from {OURS + HF}; got {args.methods}")
    if args.timeline and args.pipeline_stages < 2:
        raise SystemExit("--timeline draws the stages of a pipeline: give --pipeline-stages 2 or more")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = load_model(args.model, dtype="float32")
    L = model.config.num_layers
    prompts = read_prompts(args.prompts or args.model / PROMPTS_NAME, args.num_prompts)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    eos = list(model.config.eos_token_ids)
    hierarchies = {m: resolve_hierarchy(m, L, args.model) for m in OURS if m in args.methods}
    check_pipeline_stages(args.pipeline_stages, hierarchies)
    with ExitStack() as pipelines:
        methods = {m: OurMethod(model, h, engine_options(args)) for m, h in hierarchies.items()}
        if args.pipeline_stages > 1:
            pipelined = start_pipelines(pipelines, args, hierarchies)
            methods |= pipelined
            hierarchies |= {name: method.hierarchy for name, method in pipelined.items()}
        if set(HF) & set(args.methods):
            hf_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
            if "hf" in args.methods:
                methods["hf"] = HFMethod(hf_model, eos, tokenizer.pad_token_id)
            if "hf-early-exit" in args.methods:
                hf_exit, hf_sweep = args.hf_exit, None
                if hf_exit is None:
                    hf_exit, hf_sweep = best_hf_exit(hf_model, eos, tokenizer.pad_token_id, prompt_ids, L)
                methods["hf-early-exit"] = HFMethod(hf_model, eos, tokenizer.pad_token_id, early_exit=hf_exit)
        recorder = ModelTimeRecorder()
        runs = [(m, 1) for m in methods] + [(m, b) for b in args.batch_sizes if b > 1 for m in hierarchies]
        timings = time_interleaved(methods, runs, args.repeats, prompt_ids, args.max_new_tokens, model, recorder)
        timelines = record_timelines(methods, args, prompt_ids, timings.outputs[("ar", 1)][0]) if args.timeline else []

    # The cost table, timed now that the measured runs are over, for every shape they ran.
    context = round(statistics.fmean(map(len, prompt_ids)) + args.max_new_tokens / 2)
    shapes = {shape for engine in timings.engines.values() for shape in engine.forward_log}
    table = timed_cost_table(args.cost_table or args.out / "cost_table.json", model, str(args.model), context, shapes)
    reference = timings.outputs[("ar", 1)][0]
    new_tokens = sum(len(t) for t in reference)

    def entry(name: str, batch: int) -> dict:
        key = (name, batch)
        seconds = statistics.median(timings.seconds[key])
        tokens = sum(len(t) for t in timings.outputs[key][-1])
        result = {"tokens_per_s": round(tokens / seconds, 2), "seconds": [round(s, 3) for s in timings.seconds[key]],
                  "new_tokens": tokens} | compare_with_ar(timings.outputs[key], reference)
        engine = timings.engines.get(key)
        if engine is not None:
            hierarchy = hierarchies[name]
            stats = RequestStats.total(hierarchy, [engine.total_stats]).to_dict(hierarchy)
            result |= {
                "hierarchy": hierarchy.describe(),
                "acceptance": {str(lv["exit"]): lv["acceptance_rate"] for lv in stats["levels"][1:]},
                "tokens_per_target_pass": stats["tokens_per_target_pass"],
                "layer_forwards_per_token": stats["layer_forwards_per_token"],
                "layer_token_passes_per_token": stats["layer_token_passes_per_token"],
            }
            result |= prediction(table, engine, tokens, result["tokens_per_s"])
        if key in timings.model_time_share:
            result |= {"model_time_share": round(statistics.median(timings.model_time_share[key]), 3),
                       "model_time_share_runs": [round(e, 3) for e in timings.model_time_share[key]]}
        if key in timings.pipeline_runs:
            result["pipeline"] = pipeline_report(timings.pipeline_runs[key], methods[name].bounds)
        return result

    results = {
        "config": {"model": str(args.model), "num_prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                   "repeats": args.repeats, "threads": args.threads, "dtype": "float32", "new_tokens": new_tokens,
                   "draft_vocab": args.draft_vocab, "speculate_ahead": args.speculate_ahead,
                   "pipeline_stages": args.pipeline_stages,
                   "command": "hispec bench " + " ".join(argv if argv is not None else [])},
        "methods": {name: entry(name, 1) for name in methods},
        "batch_sizes": {str(b): {m: entry(m, b) for m in hierarchies} for b in args.batch_sizes if b > 1},
    }
    results["batch_sizes"]["1"] = {m: results["methods"][m] for m in hierarchies}
    results["batch_sizes"] = dict(sorted(results["batch_sizes"].items(), key=lambda kv: int(kv[0])))
    results["speedups"] = speedups(results["methods"])
    if args.pipeline_stages > 1:
        results["pipeline_speedups"] = pipeline_speedups(results["batch_sizes"])
    results["crossover_batch_size"] = crossover(results["batch_sizes"])
    results["cost_table"] = table.to_dict()  # the prediction's, timed separately
    results["model_time_costs"] = recorder.to_dict()  # per-shape means timed inside the runs
    if "hf-early-exit" in methods:
        results["methods"]["hf-early-exit"]["hierarchy"] = f"assistant_early_exit={methods['hf-early-exit'].early_exit}"
        results["hf_early_exit_sweep"] = hf_sweep
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plots.tokens_per_second(results, args.out / "tokens_per_s.png")
    plots.acceptance(results, args.out / "acceptance.png")
    plots.throughput_vs_batch(results, args.out / "throughput_vs_batch.png")
    for name, e in results["methods"].items():
        print(f"{name:14} {method_summary(e)}")
    for batch, entries in results["batch_sizes"].items():
        for name, e in entries.items():
            if "pipeline" in e:
                print(f"{name:14} batch {batch:>3}  {pipeline_summary(e['pipeline'])}")
    print(json.dumps(results["speedups"]), "crossover:", json.dumps(results["crossover_batch_size"]))
    for batch, path in timelines:
        report = json.loads(path.read_text())
        shares = " | ".join(f"{lane['lane']} " + "/".join(f"{lane['shares'][k]:.2f}" for k in ("busy", "transport", "idle"))
                            for lane in report["lanes"])
        print(f"timeline batch {batch}: {report['window']['length_ms']:.0f} ms, busy/transport/idle {shares}")
    print(f"wrote {args.out / 'results.json'} and {3 + len(timelines)} plots")
    return 0


def record_timelines(methods: dict, args, prompt_ids, reference: list[list[int]]) -> list[tuple[int, Path]]:
    """One recorded run of the pipelined hispec method (else layerskip's, else ar's)
    per batch size (1, and 8 if measured), after the timed runs; a window of --timeline-ms from its
    middle drawn and written as OUT/timeline[-batch8].png / .json. The (batch, JSON path) pairs."""
    from hispec.pipeline.timeline import DRIVER_MEANING, STAGE_MEANING, busy_at_once, middle_window, window_report

    base = next(m for m in ("hispec", "layerskip", "ar") if m in args.methods)
    name = pipelined_name(base, args.pipeline_stages)
    method: PipelinedMethod = methods[name]
    executor = method.pipelined.executor
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for batch in [1] + ([8] if 8 in args.batch_sizes else []):
        executor.start_timeline()
        elapsed, tokens, _ = method.run(prompt_ids, args.max_new_tokens, batch)
        lanes = executor.take_timeline()
        start, end = middle_window(lanes, round(args.timeline_ms * 1e6))
        stages = len(lanes) - 1
        layers = [{"layers": list(r)} for r in zip(method.bounds, method.bounds[1:])]
        report = {"method": name, "batch_size": batch, "num_prompts": len(prompt_ids),
                  "max_new_tokens": args.max_new_tokens, "run_seconds": round(elapsed, 4),
                  "tokens_per_s": round(sum(map(len, tokens)) / elapsed, 2), "identical_to_ar": tokens == reference,
                  "recorded_ms": {lane.name: round((lane.span[1] - lane.span[0]) / 1e6, 3) for lane in lanes}}
        report["stages_busy_at_once"] = busy_at_once(lanes[:stages], start, end)  # shares of the window: the overlap
        report |= window_report(lanes, start, end, [STAGE_MEANING] * stages + [DRIVER_MEANING], layers + [{}])
        overlap = sum(share for busy, share in report["stages_busy_at_once"].items() if int(busy) >= 2)
        stem = "timeline" if batch == 1 else f"timeline-batch{batch}"
        path = args.out / f"{stem}.json"
        path.write_text(one_line_intervals(json.dumps(report, indent=1)) + "\n")
        plots.timeline(report, args.out / f"{stem}.png",
                       f"{name}, batch {batch}: {report['window']['length_ms']:.0f} ms from the middle of a "
                       f"{elapsed * 1000:.0f} ms run ({report['tokens_per_s']:.0f} tok/s while recording); "
                       f"two or more stages busy at once {overlap:.0%} of it")
        written.append((batch, path))
    return written


def one_line_intervals(text: str) -> str:
    """Indented JSON with each [kind, start, end] interval on one line (thousands of them)."""
    return re.sub(r'\[\s+("busy"|"transport"|"idle"),\s+(\S+),\s+(\S+)\s+\]', r"[\1, \2, \3]", text)


def compare_with_ar(runs: list[list[list[int]]], reference: list[list[int]]) -> dict:
    """Every repetition's outputs (per run: tokens per prompt) against ar's: identical_to_ar is
    true only if all of them equal it; each mismatch names its repetition and prompts."""
    mismatches = [{"repetition": r, "prompts": [p for p, (got, want) in enumerate(zip(run, reference)) if got != want]
                   or list(range(len(reference)))}  # a different number of outputs: all of them
                  for r, run in enumerate(runs) if run != reference]
    return {"identical_to_ar": not mismatches, "repetitions_compared": len(runs), "mismatches": mismatches}


def prediction(table: CostTable, engine: SpecEngine, tokens: int, measured: float) -> dict:
    """The cost model's tokens/s for the forwards `engine` ran (a pipelined row: its forwards as
    if in one process, without transport), and measured / predicted."""
    predicted = predicted_tokens_per_s(table, engine.forward_log, tokens)
    return {"predicted_tokens_per_s": predicted,
            "measured_over_predicted": round(measured / predicted, 3) if predicted else None}


def method_summary(e: dict) -> str:
    """One line: measured tok/s, the cost model's prediction and model time share if any, and
    how many repetitions matched ar's output."""
    line = f"{e['tokens_per_s']:8.1f} tok/s"
    if e.get("predicted_tokens_per_s"):
        line += f"  predicted {e['predicted_tokens_per_s']:8.1f} (measured/predicted {e['measured_over_predicted']:.2f})"
    if "model_time_share" in e:
        line += f"  model time share {e['model_time_share']:.2f}"
    matched = e["repetitions_compared"] - len(e["mismatches"])
    return line + f"  identical_to_ar={e['identical_to_ar']} ({matched}/{e['repetitions_compared']} repetitions)"


def check_pipeline_stages(stages: int, hierarchies: dict) -> None:
    """Exit with a message unless every method asked for can be cut into `stages` stages."""
    from hispec.pipeline.build import check_num_stages

    for name, hierarchy in hierarchies.items():
        try:
            check_num_stages(BatchPolicy.fixed(hierarchy), stages)
        except ValueError as error:
            raise SystemExit(f"--pipeline-stages: {name}: {error}") from None


def pipeline_report(runs: list[PipelineRun], bounds: tuple[int, ...]) -> dict:
    """Per stage: medians over the repetitions of its busy / transport / idle seconds and their
    shares of the run's wall time (transport: moving hidden rows and replies, a receive counting
    the wait for the previous stage; idle: waiting for the driver's next plan). Per committed
    token: control round trips, hidden-row messages (hops), and bytes of rows (all, and without the
    prompts': decoding's own) and of plans."""
    reports = [stage_timing_report(run.stage_times, run.seconds) for run in runs]
    last = runs[-1]  # counts do not change between repetitions (same plans)
    stages = []
    for s, layers in enumerate(zip(bounds, bounds[1:])):
        rows = [report[s] for report in reports]
        stage = {"stage": s, "layers": list(layers), "steps": rows[-1]["steps"]}
        for key in ("busy_s", "transport_s", "idle_s", "busy_share", "transport_share", "idle_share"):
            stage[key] = round(statistics.median(row[key] for row in rows), 4)
        for key in ("busy", "transport"):
            stage[f"{key}_ms_per_step"] = round(1000 * stage[f"{key}_s"] / max(stage["steps"], 1), 3)
        stage |= {"bytes_sent": rows[-1]["bytes_sent"], "bytes_received": rows[-1]["bytes_received"]}
        stages.append(stage)
    per_token = lambda x: round(x / max(last.new_tokens, 1), 3)  # noqa: E731
    hidden_bytes = sum(t.bytes_sent for t in last.stage_times)
    return {"bounds": list(bounds), "stages": stages, "steps": last.steps, "hops": last.hops,
            "steps_per_token": per_token(last.steps), "hops_per_token": per_token(last.hops),
            "hidden_bytes": hidden_bytes, "prefill_hidden_bytes": last.prefill_row_bytes,
            "hidden_bytes_per_token": per_token(hidden_bytes),
            "decode_hidden_bytes_per_token": per_token(hidden_bytes - last.prefill_row_bytes),
            "plan_bytes_per_token": per_token(last.plan_bytes),
            "hidden_bytes_per_hop": round(hidden_bytes / max(last.hops, 1), 1)}


def pipeline_summary(report: dict) -> str:
    """One line: each stage's busy / transport / idle shares, then bytes per committed token."""
    shares = " | ".join(f"s{st['stage']} {st['busy_share']:.2f}/{st['transport_share']:.2f}/{st['idle_share']:.2f}"
                        for st in report["stages"])
    return (f"busy/transport/idle {shares}; per token: {report['hops_per_token']:.2f} hops, "
            f"{report['hidden_bytes_per_token']:.0f} B rows ({report['decode_hidden_bytes_per_token']:.0f} B "
            f"without prompts), {report['plan_bytes_per_token']:.0f} B plans")


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


def pipeline_speedups(by_batch: dict) -> dict:
    """Per batch size, each pipelined row's tokens/s over its single-process method's."""
    out = {}
    for batch, entry in by_batch.items():
        for name, e in entry.items():
            base, pipelined = base_method(name)
            if pipelined and base in entry:
                out.setdefault(batch, {})[f"{name}/{base}"] = round(e["tokens_per_s"] / entry[base]["tokens_per_s"], 3)
    return out


def crossover(by_batch: dict) -> dict:
    """Per speculative method (single process, and pipelined against pipelined ar): the smallest
    measured batch size where autoregressive decoding is at least as fast (None: speculation wins
    at every measured size)."""
    names = list(dict.fromkeys(m for entry in by_batch.values() for m in entry))
    out = {}
    for method in [m for m in names if base_method(m)[0] in ("layerskip", "hispec")]:
        ar = "ar" + base_method(method)[1]
        sizes = [b for b, entry in by_batch.items() if method in entry and ar in entry]
        out[method] = next((int(b) for b in sizes if by_batch[b][ar]["tokens_per_s"] >= by_batch[b][method]["tokens_per_s"]), None)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
