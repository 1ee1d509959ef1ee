"""A short GPU benchmark for scripts/gpu-check.sh: the bundled model on CUDA, batch 1 and 8,
one process vs a 2-stage NCCL pipeline (when 2 GPUs exist). Prints one JSON line per row.

    python -m hispec.bench.gpu [--max-new-tokens 64] [--num-prompts 8]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoTokenizer

from hispec.bench.prompts import bundled_heldout_prompts
from hispec.engine import EngineConfig, SpecEngine
from hispec.model import load_model
from hispec.models import DEFAULT_MODEL
from hispec.speculation import Request, resolve_policy


def timed(engine: SpecEngine, prompts: list[list[int]], max_new: int, batch: int) -> tuple[float, list[list[int]]]:
    engine.generate([Request(prompts[0], 8)])  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started, outputs = time.perf_counter(), []
    for i in range(0, len(prompts), batch):
        outputs += [r.token_ids for r in engine.generate([Request(p, max_new) for p in prompts[i : i + batch]])]
    seconds = time.perf_counter() - started
    return sum(map(len, outputs)) / seconds, outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=8)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    prompts = [tokenizer(p)["input_ids"] for p in bundled_heldout_prompts()[: args.num_prompts]]
    model = load_model(DEFAULT_MODEL, device="cuda")
    reference = {}
    for method in ("ar", "hispec"):
        policy = resolve_policy(method, 16, DEFAULT_MODEL)
        for batch in (1, 8):
            tps, out = timed(SpecEngine(model, policy, EngineConfig(max_batch_size=8)), prompts, args.max_new_tokens, batch)
            reference.setdefault(batch, out)
            print(json.dumps({"method": method, "stages": 1, "batch": batch, "tokens_per_s": round(tps, 1),
                              "identical_to_ar": out == reference[batch]}), flush=True)
    del model
    if torch.cuda.device_count() < 2:
        print(json.dumps({"pipeline": "skipped: needs 2 GPUs"}))
        return 0
    import ray

    from hispec.pipeline import stage_timing_report
    from hispec.pipeline.build import PipelinedEngine

    ray.init(address="local", num_gpus=torch.cuda.device_count(), include_dashboard=False, log_to_driver=False)
    try:
        for method in ("ar", "hispec"):
            policy = resolve_policy(method, 16, DEFAULT_MODEL)
            with PipelinedEngine.start(DEFAULT_MODEL, policy, 2, EngineConfig(max_batch_size=8), device="cuda") as pp:
                for batch in (1, 8):
                    pp.executor.stage_times(reset=True)
                    started = time.perf_counter()
                    tps, out = timed(pp.engine, prompts, args.max_new_tokens, batch)
                    wall = time.perf_counter() - started
                    stages = stage_timing_report(pp.executor.stage_times(), wall)
                    print(json.dumps({"method": f"{method}-pp2", "stages": 2, "batch": batch, "tokens_per_s": round(tps, 1),
                                      "identical_to_ar": out == reference[batch], "bounds": pp.pipeline.spec.bounds,
                                      "stage_times": stages}), flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
