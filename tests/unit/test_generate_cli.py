"""`hispec generate`: the interface other tools rely on (flags, JSON lines, errors)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from hispec.generate import main
from hispec.model import load_model
from hispec.model.greedy import greedy_generate
from hispec.models import DEFAULT_MODEL

PROMPTS = ["def fibonacci(n):\n", "import os\n\n\ndef walk(root):\n", "class Queue:\n"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def run_json(capsys, *args) -> list[dict]:
    assert main([*args, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_every_method_prints_greedy_output_and_stats(capsys, prompts_file):
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    model = load_model(DEFAULT_MODEL)
    expected = [greedy_generate(model, tokenizer(p)["input_ids"], 40, model.config.eos_token_ids)[0] for p in PROMPTS]
    for args in (["--method", "ar"], ["--method", "layerskip", "--exits", "3", "--budgets", "5"],
                 ["--method", "hispec"], ["--method", "hispec", "--exits", "1,3,6", "--budgets", "2,2,3"],
                 ["--method", "auto"]):
        records = run_json(capsys, "--prompts", str(prompts_file), "--max-new-tokens", "40", *args)
        assert [r["prompt"] for r in records] == PROMPTS
        assert [r["token_ids"] for r in records] == expected
        for record in records:
            assert record["text"] == tokenizer.decode(record["token_ids"], skip_special_tokens=True)
            assert record["finish_reason"] == "length"
            assert record["stats"]["new_tokens"] == 40 and "levels" in record["stats"]


def test_seeded_sampling_is_reproducible_alone_or_batched(capsys, prompts_file):
    flags = ["--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed", "7", "--max-new-tokens", "24"]
    batched = run_json(capsys, "--prompts", str(prompts_file), *flags)
    alone = run_json(capsys, "--prompt", PROMPTS[1], "--max-batch-size", "1", *flags)
    assert alone[0]["token_ids"] == batched[1]["token_ids"]
    other_seed = run_json(capsys, "--prompt", PROMPTS[1], *flags[:-4], "--seed", "8", "--max-new-tokens", "24")
    assert other_seed[0]["token_ids"] != alone[0]["token_ids"]


def test_stop_string_and_streamed_text(capsys):
    # greedy continues "\n# This is a Contributor Agreement.\n\n#\n#..." here
    assert main(["--prompt", PROMPTS[0], "--max-new-tokens", "60", "--stop", "Agreement.\n\n"]) == 0
    out = capsys.readouterr().out
    assert out == PROMPTS[0] + "\n# This is a Contributor \n[finish_reason=stop]\n"


@pytest.mark.parametrize("args,message", [
    (["--method", "hispec", "--exits", "4"], "two or more exits"),
    (["--method", "layerskip", "--exits", "2,4", "--budgets", "1,1"], "exactly one exit"),
    (["--exits", "4,2", "--budgets", "1,1"], "increasing"),
    (["--top-p", "0"], "top_p"),
    (["--temperature", "nan"], "temperature"),
    (["--max-new-tokens", "-3"], "max-new-tokens"),
    (["--exits", "a,b"], "comma-separated integers"),
    (["--method", "auto", "--exits", "2"], "tuning data"),
])
def test_bad_arguments_exit_2_with_a_message(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--prompt", "x", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_installed_command_runs():
    done = subprocess.run([sys.executable, "-m", "hispec.cli", "generate", "--prompt", "def f(x):", "--json",
                           "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert len(record["token_ids"]) == 8 and record["stats"]["hierarchy"].startswith("hispec")
