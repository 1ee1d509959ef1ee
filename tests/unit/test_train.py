"""Training recipe: a tiny model learns, its checkpoint round-trips through our loader and
transformers, the tokenizer loads with AutoTokenizer, resume is exact; stdlib corpus split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hispec.model import load_model
from hispec.train import data as data_mod
from hispec.train.evaluate import evaluate_exits
from hispec.train.recipe import TrainConfig, build_model, exit_weights, model_config, train, training_loss

_SNIPPET = '''
def {name}(values, scale={k}):
    """Scale and sum the values."""
    total = 0
    for v in values:
        if v > {k}:
            total += v * scale
        else:
            total -= v
    return total


class {cls}:
    def __init__(self, items):
        self.items = list(items)

    def run(self):
        return {name}(self.items)
'''


def _write_corpus(root: Path, n: int = 12) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        body = "\n".join(_SNIPPET.format(name=f"f{i}_{j}", cls=f"C{i}{j}", k=j) for j in range(4))
        (root / f"mod_{i}.py").write_text(f"import os\nimport sys\n{body}\n")
    return root


def _tiny(**kw) -> TrainConfig:
    base = dict(layers=4, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab_size=300, seq_len=64,
                batch_size=8, steps=40, lr=3e-3, warmup_steps=5, checkpoint_every=20, log_every=5,
                exit_token_fraction=0.5, layer_dropout=0.2, bf16=False, save_dtype="float32")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    corpus = _write_corpus(tmp / "corpus")
    cfg = _tiny()
    result = train(cfg, str(corpus), tmp / "out", progress=False)
    return cfg, corpus, result


def test_loss_falls_and_outputs_written(trained):
    cfg, _, result = trained
    assert result.steps_done == cfg.steps
    assert result.last_loss < 0.6 * result.first_loss
    out = result.out_dir
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "data_split.json", "metrics.jsonl", "loss_per_exit.png", "train_config.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    assert set(records[-1]["loss"]) == {"1", "2", "3", "4"}
    assert (out / "checkpoint-20" / "state.pt").is_file()


def test_checkpoint_matches_transformers(trained):
    transformers = pytest.importorskip("transformers")
    _, _, result = trained
    ours = load_model(result.out_dir, dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(result.out_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours.exit_logits(ours.causal_hidden_states(ids, [4])[0])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_saved_weights_equal_trained_module(tmp_path):
    from hispec.train import checkpointing as ckpt
    from hispec.train.tokenizer import train_tokenizer

    cfg = _tiny()
    tok = train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, cfg.vocab_size)
    model = build_model(model_config(cfg, 0, 1), seed=3)
    batch = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(1))
    loss, _ = training_loss(model, batch, cfg, 0, torch.Generator().manual_seed(0))
    loss.backward()  # make sure we save a model that has seen a backward (grads don't leak into weights)
    model.eval()
    ckpt.save_checkpoint(model, tok, tmp_path, "float32", 2)
    loaded = load_model(tmp_path, native=False)  # the same (Python) kernels as `model`: exact equality
    ids = batch[:, :-1]
    with torch.no_grad():
        want = [model.exit_logits(h) for h in model.causal_hidden_states(ids, [1, 2, 3, 4])]
    got = [loaded.exit_logits(h) for h in loaded.causal_hidden_states(ids, [1, 2, 3, 4])]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_autotokenizer_round_trip(trained):
    transformers = pytest.importorskip("transformers")
    _, corpus, result = trained
    tok = transformers.AutoTokenizer.from_pretrained(result.out_dir)
    text = (corpus / "mod_0.py").read_text() + "\n\tx = 'héllo ✓'  # weird  spacing\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert tok.convert_tokens_to_ids("<s>") == json.loads((result.out_dir / "config.json").read_text())["bos_token_id"]


def test_resume_is_exact(tmp_path, trained):
    cfg, corpus, full = trained
    out = tmp_path / "resumed"
    # Stop the run right after the step-20 checkpoint, as a crash would, then resume.
    short = train(cfg, str(corpus), out, progress=False, max_minutes=1e-9)  # time is up before step 1
    assert short.steps_done == 0 and short.stopped_early
    partial = _train_until(cfg, corpus, out, 20)
    assert (partial / "checkpoint-20" / "state.pt").is_file()
    resumed = train(cfg, str(corpus), out, resume=True, progress=False)
    assert resumed.steps_done == cfg.steps
    a, b = load_model(full.out_dir), load_model(resumed.out_dir)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=0, rtol=0, msg=name)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 41, 5))


def _train_until(cfg: TrainConfig, corpus: Path, out: Path, step: int) -> Path:
    """Run `cfg` but interrupt it right after `step` (by raising from the checkpoint hook)."""
    from hispec.train import recipe

    original = recipe._save_intermediate

    class _Stop(Exception):
        pass

    def save_then_stop(*args, **kwargs):
        original(*args, **kwargs)
        raise _Stop

    recipe._save_intermediate = save_then_stop
    try:
        with pytest.raises(_Stop):
            train(cfg, str(corpus), out, progress=False)
    finally:
        recipe._save_intermediate = original
    return out


def test_evaluate_exits(trained):
    _, corpus, result = trained
    report = evaluate_exits(result.out_dir, data=str(corpus), seq_len=32, max_sequences=4, prompts=2,
                            prompt_len=8, new_tokens=4, out_json=result.out_dir / "exit_eval.json")
    tf, greedy = report["teacher_forced_agreement"], report["greedy_acceptance"]
    assert set(tf) == set(greedy) == {"1", "2", "3", "4"}
    assert tf["4"] == greedy["4"] == 1.0
    assert all(0.0 <= v <= 1.0 for v in tf.values())
    assert (result.out_dir / "exit_eval.json").is_file()


def test_exit_weights_schedule():
    cfg = _tiny(layers=8, exit_weight=2.0, exit_shape="early", exit_ramp_fraction=0.5, steps=100)
    assert exit_weights(cfg, 0) == {}  # ramp starts at zero weight
    w = exit_weights(cfg, 50)
    assert sorted(w) == list(range(1, 8))
    assert pytest.approx(sum(w.values())) == 2.0
    assert w[1] > w[4] > w[7]
    rotating = _tiny(layers=8, exit_rotation=4)
    assert sorted(exit_weights(rotating, 1)) == [3, 7]


def test_train_config_validation():
    with pytest.raises(ValueError):
        _tiny(hidden=65)
    with pytest.raises(ValueError):
        _tiny(exit_layers=(4,))
    with pytest.raises(ValueError):
        _tiny(layer_dropout=1.5)


# ---- stdlib corpus -------------------------------------------------------------------------
def test_stdlib_corpus_excludes_tests_and_site_packages():
    files = data_mod.stdlib_corpus()
    root = data_mod.stdlib_root()
    rel = [f.relative_to(root).parts for f in files]
    assert len(files) > 300
    assert files == sorted(files)
    for parts in rel:
        assert "site-packages" not in parts
        assert not {"test", "tests", "idle_test"} & set(parts[:-1]), parts
    names = {"/".join(p) for p in rel}
    assert "os.py" in names and "json/decoder.py" in names


def test_stdlib_split_is_deterministic_and_disjoint(tmp_path):
    docs = data_mod.load_documents("stdlib")
    split = data_mod.split_documents(docs)
    again = data_mod.split_documents(data_mod.load_documents("stdlib"))
    assert split == again
    train_names = {d.name for d in split.train}
    held_names = {d.name for d in split.heldout}
    assert held_names and not train_names & held_names
    assert len(train_names) + len(held_names) == len(docs)
    assert all(data_mod.is_heldout(n) for n in held_names)
    manifest = json.loads(data_mod.write_manifest(split, "stdlib", tmp_path).read_text())
    assert manifest["heldout"] == [d.name for d in split.heldout]


def test_batches_are_a_function_of_step():
    seqs = torch.arange(10 * 5).view(10, 5)
    first = [data_mod.batch_at(seqs, s, 4, seed=1) for s in range(6)]
    it = data_mod.batches(seqs, 4, seed=1, start_step=3)
    assert all(torch.equal(next(it), first[s]) for s in range(3, 6))
    epoch0 = torch.cat(first[:2] + [first[2][:2]])[:, 0]
    assert sorted(epoch0.tolist()) == list(range(0, 50, 5))  # each sequence once per epoch
