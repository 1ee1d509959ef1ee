"""`hispec generate --pipeline-stages S`: the same command over S stage actors of a Ray instance
it starts for itself, run as a user would (a subprocess), against the single-process command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hispec.generate import main

PROMPT = "def fibonacci(n):\n"


def generate_json(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "hispec.cli", "generate", "--prompt", PROMPT, "--max-new-tokens", "24",
                           "--json", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = done.stdout.splitlines()  # stdout is the JSON line only: Ray's logs stay off it
    return json.loads(line)


@pytest.mark.slow
def test_two_stages_print_what_one_process_prints():
    one = generate_json("--method", "hispec", "--pipeline-stages", "1")
    two = generate_json("--method", "hispec", "--pipeline-stages", "2")
    assert len(one["token_ids"]) == 24
    assert two["token_ids"] == one["token_ids"] and two["text"] == one["text"]
    # The rest too, but for the statistics: the pipeline speculates ahead (EngineConfig.speculate_ahead),
    # so its steps differ from one process's; the tokens they commit do not.
    assert {k: v for k, v in two.items() if k != "stats"} == {k: v for k, v in one.items() if k != "stats"}
    assert two["stats"]["new_tokens"] == one["stats"]["new_tokens"] == 24


@pytest.mark.parametrize("args,message", [
    (["--pipeline-stages", "0"], "between 1 and 11"),
    (["--pipeline-stages", "12"], "stage 0 holds layers [0, 6)"),  # bundled model: deepest exit 6 of 16 layers
    (["--method", "ar", "--pipeline-stages", "17"], "between 1 and 16"),
    (["--pipeline-stages", "2", "--compile"], "--compile"),
])
def test_a_stage_count_the_model_cannot_take_exits_2_before_ray_starts(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--prompt", "x", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
