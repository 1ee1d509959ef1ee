"""How well each early exit agrees with the final layer, on held-out text.

(a) teacher-forced: over held-out sequences, the fraction of positions where the exit's argmax
    equals the final layer's argmax;
(b) greedy acceptance: the full model continues held-out prompts greedily; per exit, the
    fraction of those generated positions where the exit's argmax is the full model's token
    (what a self-speculative draft from that exit would get accepted, token by token).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from hispec.model import load_model
from hispec.model.model import EarlyExitModel
from hispec.models import DEFAULT_MODEL
from hispec.train import data as data_mod
from hispec.train.tokenizer import load_tokenizer, special_ids


@torch.inference_mode()
def teacher_forced_agreement(model: EarlyExitModel, sequences: torch.Tensor, batch_size: int = 8) -> dict[int, float]:
    """sequences [N, T] -> {exit layer: top-1 agreement with the final layer}."""
    L = model.config.num_layers
    exits = list(range(1, L + 1))
    agree = torch.zeros(L, dtype=torch.float64)
    total = 0
    for chunk in sequences.split(batch_size):
        hidden = model.causal_hidden_states(chunk, exits)
        final = model.exit_logits(hidden[-1]).argmax(-1)
        for i, h in enumerate(hidden):
            agree[i] += (model.exit_logits(h).argmax(-1) == final).sum().item()
        total += final.numel()
    return {e: agree[e - 1].item() / total for e in exits}


@torch.inference_mode()
def greedy_acceptance(model: EarlyExitModel, prompts: torch.Tensor, new_tokens: int) -> dict[int, float]:
    """prompts [B, P] (same length) -> {exit layer: fraction of the full model's greedy tokens
    the exit predicts too}. Re-runs the whole growing sequence each step: simple, evaluation only."""
    L = model.config.num_layers
    exits = list(range(1, L + 1))
    hits = torch.zeros(L, dtype=torch.float64)
    seq = prompts
    for _ in range(new_tokens):
        hidden = model.causal_hidden_states(seq, exits)
        preds = torch.stack([model.exit_logits(h[:, -1]).argmax(-1) for h in hidden])  # [L, B]
        token = preds[-1]
        hits += (preds == token).sum(dim=1).double()
        seq = torch.cat([seq, token[:, None]], dim=1)
    n = new_tokens * prompts.shape[0]
    return {e: hits[e - 1].item() / n for e in exits}


def heldout_documents(model_dir: Path, files: Sequence[str] | None, data: str | None) -> list[data_mod.Document]:
    """Explicit files, else the held-out half of the split recorded by training (`data_split.json`)."""
    if files:
        return [data_mod.Document(Path(f).name, Path(f).read_text(encoding="utf-8")) for f in files]
    manifest = json.loads((model_dir / "data_split.json").read_text())
    source = data or manifest["source"]
    wanted = set(manifest["heldout"])
    return [d for d in data_mod.load_documents(source) if d.name in wanted]


def evaluate_exits(
    model_dir: str | Path,
    files: Sequence[str] | None = None,
    *,
    data: str | None = None,
    seq_len: int = 256,
    max_sequences: int = 64,
    prompts: int = 8,
    prompt_len: int = 32,
    new_tokens: int = 32,
    threads: int = 2,
    out_json: str | Path | None = None,
) -> dict:
    torch.set_num_threads(threads)
    model_dir = Path(model_dir)
    model = load_model(model_dir, dtype=torch.float32)
    tok = load_tokenizer(model_dir)
    ids = special_ids(tok)
    docs = heldout_documents(model_dir, files, data)
    if not docs:
        raise ValueError("no held-out documents to evaluate on")
    stream = data_mod.encode_documents(tok, docs, ids["bos"], ids["eos"])
    seq_len = min(seq_len, stream.numel() - 1)
    sequences = data_mod.pack(stream, seq_len)[:max_sequences, :seq_len]
    tf = teacher_forced_agreement(model, sequences)
    prompt_batch = _prompts(tok, docs, ids["bos"], prompts, prompt_len)
    greedy = greedy_acceptance(model, prompt_batch, new_tokens) if prompt_batch is not None else {}
    result = {
        "model": str(model_dir),
        "documents": len(docs),
        "teacher_forced_positions": int(sequences.numel()),
        "greedy_positions": 0 if prompt_batch is None else prompt_batch.shape[0] * new_tokens,
        "teacher_forced_agreement": {str(e): round(v, 4) for e, v in tf.items()},
        "greedy_acceptance": {str(e): round(v, 4) for e, v in greedy.items()},
    }
    if out_json is not None:
        Path(out_json).write_text(json.dumps(result, indent=1))
    return result


def _prompts(tok, docs, bos_id: int, count: int, length: int) -> torch.Tensor | None:
    """The first `length` tokens (after <s>) of up to `count` documents long enough."""
    rows = []
    for d in docs:
        enc = tok.encode(d.text, add_special_tokens=False).ids
        if len(enc) >= length - 1:
            rows.append([bos_id, *enc[: length - 1]])
        if len(rows) == count:
            break
    return torch.tensor(rows, dtype=torch.int64) if rows else None


def eval_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hispec eval-exits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint directory (default: bundled)")
    parser.add_argument("--files", nargs="*", default=None, help="held-out files (default: the training split's)")
    parser.add_argument("--data", default=None, help="corpus source if it moved since training")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-sequences", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON output path (default: <model>/exit_eval.json)")
    args = parser.parse_args(argv)
    result = evaluate_exits(
        args.model, args.files, data=args.data, seq_len=args.seq_len, max_sequences=args.max_sequences,
        prompts=args.prompts, prompt_len=args.prompt_len, new_tokens=args.new_tokens, threads=args.threads,
        out_json=args.out or Path(args.model) / "exit_eval.json",
    )
    print(json.dumps(result, indent=1))
    return 0


main = eval_main  # the `hispec eval-exits` entry (hispec.cli calls <module>.main)
