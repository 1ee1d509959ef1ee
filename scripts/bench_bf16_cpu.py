"""Decode speed on CPU of the bundled model in float32, in bfloat16 as `load_model` runs it now
(bf16 weights on the C++ stack's packed fp32 path), and in bfloat16 as it ran before (bf16
parameters, the C++ stack on ATen bf16 ops), with the same engine, prompts and threads.

    .venv/bin/python scripts/bench_bf16_cpu.py --num-prompts 8 --max-new-tokens 64 --repeats 3

One sequence at a time (max_batch_size 1), after an untimed warm-up of every variant and method,
repetitions interleaved across the variants; prints
new tokens per second (wall time of `SpecEngine.generate`, prefill included) per variant and
method, the median over repeats, and whether each variant's tokens equal float32's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoTokenizer

from hispec.bench.prompts import bundled_heldout_prompts
from hispec.engine import EngineConfig, SpecEngine
from hispec.model import EarlyExitModel, load_model
from hispec.models import DEFAULT_MODEL
from hispec.speculation import Request, paper_default


def aten_bf16_model(path) -> EarlyExitModel:
    """What `load_model(path, dtype="bfloat16")` built on CPU before bf16 weights took the packed
    fp32 path: bf16 parameters in their [out, in] layout, the rotary frequencies in fp32, the C++
    stack on (it then ran every layer with ATen bf16 ops)."""
    model = load_model(path, dtype="float32", native=False)
    for layer in model.layers.values():
        for proj in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
            proj.weight.data = proj.weight.data.contiguous()  # undo store_projections_input_major (fp32 only)
    inv_freq = model.inv_freq
    model.to(torch.bfloat16)
    model.inv_freq = inv_freq  # load_model kept this buffer in fp32
    model.use_native_layers()
    assert model.dtype == torch.bfloat16 and model.native_layers
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="ar,hispec")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    prompts = [tokenizer(p)["input_ids"] for p in bundled_heldout_prompts()[: args.num_prompts]]
    models = {
        "float32": load_model(DEFAULT_MODEL, dtype="float32"),
        "bfloat16 (now: packed fp32 path)": load_model(DEFAULT_MODEL, dtype="bfloat16"),
        "bfloat16 (before: ATen bf16)": aten_bf16_model(DEFAULT_MODEL),
    }
    config = EngineConfig(max_batch_size=1, max_context=512)
    for model in models.values():  # warm-up, untimed: the first engine run in a process costs seconds
        for method in args.methods.split(","):
            SpecEngine(model, paper_default(method, model.config.num_layers), config).generate([Request(prompts[0], 8)])
    rates: dict[tuple[str, str], list[float]] = {}
    tokens: dict[tuple[str, str], list[list[int]]] = {}
    for _ in range(args.repeats):
        for method in args.methods.split(","):
            for name, model in models.items():
                engine = SpecEngine(model, paper_default(method, model.config.num_layers), config)
                start = time.perf_counter()
                results = engine.generate([Request(ids, args.max_new_tokens) for ids in prompts])
                elapsed = time.perf_counter() - start
                rates.setdefault((name, method), []).append(sum(len(r.token_ids) for r in results) / elapsed)
                tokens[name, method] = [r.token_ids for r in results]
    print(f"{args.num_prompts} prompts x {args.max_new_tokens} new tokens, batch 1, {args.threads} threads, "
          f"median of {args.repeats}")
    for (name, method), values in rates.items():
        same = tokens[name, method] == tokens["float32", method]
        print(f"{name:34s} {method:8s} {statistics.median(values):7.1f} tok/s  "
              f"runs {[round(v, 1) for v in values]}  same tokens as float32: {same}")


if __name__ == "__main__":
    main()
