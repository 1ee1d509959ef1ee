"""Runtime micro-benchmark: our decode step (the C++ layer stack, the Python layer loop, and the
torch.compile'd loop) vs transformers' eager model with its KV cache, and the cost of a k-token
verify forward relative to a 1-token forward.

    hispec bench-runtime --out runs/bench-runtime

Builds a random Llama checkpoint of the given shape (default 8 layers, hidden 256), saves it
with `save_pretrained`, loads it into both runtimes, and times greedy decoding with the
repetitions interleaved (ours, python, compiled, HF, ours, ...). Reports medians; writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from hispec.model import load_model, resolve_dtype


@dataclass(frozen=True)
class RuntimeBenchConfig:
    layers: int = 8
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 704
    vocab: int = 8192
    prompt_len: int = 32
    new_tokens: int = 96
    verify_tokens: int = 5
    repeats: int = 5
    threads: int = 2
    dtypes: tuple[str, ...] = ("float32", "bfloat16")


def make_random_checkpoint(cfg: RuntimeBenchConfig, directory: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=1024, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(directory)


@torch.inference_mode()
def decode_ours(model, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], float]:
    """Greedy decode; returns tokens and seconds per decoded token (prefill excluded)."""
    L = model.config.num_layers
    cache = model.new_cache(num_slots=1, capacity=prompt.shape[1] + new_tokens + 1)
    step = model.plan(cache, [0], prompt.shape[1])
    hidden = model.forward_layers(model.embed(prompt), step, cache, 0, L)
    token = model.exit_logits(hidden[:, -1]).argmax(-1, keepdim=True)  # [1, 1]
    out = [int(token)]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        hidden = model.forward_layers(model.embed(token), model.plan(cache, [0], 1), cache, 0, L)
        token = model.exit_logits(hidden[:, -1]).argmax(-1, keepdim=True)
        out.append(int(token))  # host sync, as any decode loop that streams tokens has
    return out, (time.perf_counter() - start) / (new_tokens - 1)


@torch.inference_mode()
def decode_hf(model, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], float]:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    logits = model(prompt, cache=cache, use_cache=True).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
    out = [int(token)]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits = model(token, cache=cache, use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(token))
    return out, (time.perf_counter() - start) / (new_tokens - 1)


@torch.inference_mode()
def forward_cost(model, context: int, tokens: int, iters: int = 30) -> float:
    """Median seconds of one full-depth forward of `tokens` new tokens after `context` tokens."""
    L = model.config.num_layers
    cache = model.new_cache(num_slots=1, capacity=context + tokens)
    ids = torch.randint(0, model.config.vocab_size, (1, context + tokens))
    model.forward_layers(model.embed(ids[:, :context]), model.plan(cache, [0], context), cache, 0, L)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        hidden = model.forward_layers(model.embed(ids[:, context:]), model.plan(cache, [0], tokens), cache, 0, L)
        model.exit_logits(hidden).argmax(-1).tolist()  # verification reads every position's argmax
        times.append(time.perf_counter() - start)
        cache.rollback((0, L), [0], [context])
    return statistics.median(times)


def run(cfg: RuntimeBenchConfig) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(cfg.threads)
    results: dict = {"config": asdict(cfg), "dtypes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        make_random_checkpoint(cfg, Path(tmp))
        prompt = torch.randint(0, cfg.vocab, (1, cfg.prompt_len), generator=torch.Generator().manual_seed(0))
        for dtype_name in cfg.dtypes:
            dtype = resolve_dtype(dtype_name)
            ours = load_model(tmp, dtype=dtype)  # the C++ layer stack where it can be built
            python = load_model(tmp, dtype=dtype, native=False)
            compiled = load_model(tmp, dtype=dtype, native=False).compile_layers()
            decode_ours(compiled, prompt, cfg.new_tokens)  # compile (excluded from timing)
            hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="eager").eval()
            ours_ms, python_ms, compiled_ms, hf_ms = [], [], [], []
            same_as_hf = same_compiled = same_python = True
            for _ in tqdm(range(cfg.repeats), desc=f"decode {dtype_name}", unit="rep"):
                tokens_ours, s_ours = decode_ours(ours, prompt, cfg.new_tokens)
                tokens_python, s_python = decode_ours(python, prompt, cfg.new_tokens)
                tokens_compiled, s_compiled = decode_ours(compiled, prompt, cfg.new_tokens)
                tokens_hf, s_hf = decode_hf(hf, prompt, cfg.new_tokens)
                ours_ms.append(s_ours * 1e3)
                python_ms.append(s_python * 1e3)
                compiled_ms.append(s_compiled * 1e3)
                hf_ms.append(s_hf * 1e3)
                same_as_hf &= tokens_ours == tokens_hf
                same_compiled &= tokens_compiled == tokens_python
                same_python &= tokens_python == tokens_ours
            context = cfg.prompt_len + cfg.new_tokens
            one = forward_cost(ours, context, 1)
            k = forward_cost(ours, context, cfg.verify_tokens)
            results["dtypes"][dtype_name] = {
                "native_layers": ours.native_layers,
                "ours_ms_per_token": statistics.median(ours_ms),
                "python_ms_per_token": statistics.median(python_ms),
                "compiled_ms_per_token": statistics.median(compiled_ms),
                "hf_ms_per_token": statistics.median(hf_ms),
                "speedup_vs_hf": statistics.median(hf_ms) / statistics.median(ours_ms),
                "python_speedup_vs_hf": statistics.median(hf_ms) / statistics.median(python_ms),
                "compiled_speedup_vs_hf": statistics.median(hf_ms) / statistics.median(compiled_ms),
                "ours_ms_per_token_runs": ours_ms,
                "python_ms_per_token_runs": python_ms,
                "compiled_ms_per_token_runs": compiled_ms,
                "hf_ms_per_token_runs": hf_ms,
                # bf16 rounding differs between implementations, so near-ties may flip there;
                # fp32 is the reference for equality.
                "greedy_tokens_identical_to_hf": same_as_hf,
                "compiled_tokens_identical_to_eager": same_compiled,  # eager: the Python loop
                "python_tokens_identical_to_ours": same_python,
                "forward_1_token_ms": one * 1e3,
                f"forward_{cfg.verify_tokens}_tokens_ms": k * 1e3,
                f"verify_{cfg.verify_tokens}_vs_1_ratio": k / one,
            }
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = results["config"]["verify_tokens"]
    names = list(results["dtypes"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    xs = range(len(names))
    series = [("hf_ms_per_token", "transformers eager"), ("python_ms_per_token", "hispec, Python layer loop"),
              ("compiled_ms_per_token", "hispec, compiled loop"), ("ours_ms_per_token", "hispec, C++ layer stack")]
    for i, (key, label) in enumerate(series):
        a.bar([x + (i - 1.5) * 0.2 for x in xs], [results["dtypes"][n][key] for n in names], 0.2, label=label)
    a.set_xticks(list(xs), names)
    a.set_ylabel("ms per decoded token (median)")
    a.set_title("decode step, batch 1")
    a.legend()
    b.bar(names, [results["dtypes"][n][f"verify_{k}_vs_1_ratio"] for n in names])
    b.axhline(1.5, color="red", linestyle="--", label="goal <= 1.5")
    b.set_ylabel(f"{k}-token forward / 1-token forward")
    b.set_title("verify cost")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hispec bench-runtime", description=__doc__.split("\n\n")[0])
    defaults = RuntimeBenchConfig()
    for field in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "prompt_len",
                  "new_tokens", "verify_tokens", "repeats", "threads"):
        parser.add_argument("--" + field.replace("_", "-"), type=int, default=getattr(defaults, field))
    parser.add_argument("--dtypes", default=",".join(defaults.dtypes))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-runtime"))
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    args["dtypes"] = tuple(args["dtypes"].split(","))
    results = run(RuntimeBenchConfig(**args))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "runtime.png")
    k = results["config"]["verify_tokens"]
    print(f"{'dtype':10} {'ours ms/tok':>12} {'python':>7} {'compiled':>9} {'hf ms/tok':>10} {'speedup':>8}"
          f" {'python':>7} {'compiled':>9} {k}-vs-1 fwd  same-as-hf  python-same  compiled-same")
    for name, r in results["dtypes"].items():
        print(f"{name:10} {r['ours_ms_per_token']:12.2f} {r['python_ms_per_token']:7.2f} {r['compiled_ms_per_token']:9.2f}"
              f" {r['hf_ms_per_token']:10.2f} {r['speedup_vs_hf']:8.2f}x {r['python_speedup_vs_hf']:6.2f}x"
              f" {r['compiled_speedup_vs_hf']:8.2f}x {r[f'verify_{k}_vs_1_ratio']:10.2f}x"
              f"  {r['greedy_tokens_identical_to_hf']!s:10} {r['python_tokens_identical_to_ours']!s:12}"
              f" {r['compiled_tokens_identical_to_eager']}")
    print(f"wrote {out / 'results.json'} and {out / 'runtime.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
