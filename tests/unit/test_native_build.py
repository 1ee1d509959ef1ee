"""Building and finding the C++ layer stack: the cache key (a pure function of the build's inputs),
the build command, and the failures it must not hide."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hispec.model import native
from hispec.model.native import BuildInputs, NativeBuildError, build_layer_stack, native_enabled
from hispec.model.native.__main__ import main
from hispec.model.native.key import cpu_target, cpuinfo_flags, parse_target_help, probe

needs_native = pytest.mark.skipif(not native_enabled(), reason="HISPEC_NATIVE=0: the Python layer loop was chosen")
REPO = Path(__file__).resolve().parents[2]

INPUTS = BuildInputs(
    sources="ab" * 32,
    compiler="/usr/bin/x86_64-linux-gnu-g++-12",
    compiler_version="g++ (Debian 12.2.0-14) 12.2.0",
    cpu_target=("-m64", "-march=sapphirerapids", "-mavx2", "-mavx512f"),
    cflags=("-O3", "-march=native", "-fopenmp"),
    ldflags=("-fopenmp",),
    torch="2.13.0+cpu",
    python="cpython-311 x86_64",
)
CHANGES = {  # one change each: what another machine, toolchain or checkout would have
    "sources": "cd" * 32,
    "compiler": "/usr/bin/clang++-16",
    "compiler_version": "g++ (Debian 12.3.0-1) 12.3.0",
    "cpu_target": ("-m64", "-march=skylake", "-mavx2"),  # no AVX-512: a sapphirerapids build would crash
    "cflags": ("-O3", "-march=native"),
    "ldflags": (),
    "torch": "2.12.0+cpu",
    "python": "cpython-312 x86_64",
}


def test_the_key_is_a_function_of_the_inputs():
    assert INPUTS.key() == dataclasses.replace(INPUTS).key()
    assert INPUTS.module_name == f"hispec_native_{INPUTS.key()}"
    assert set(CHANGES) == {field.name for field in dataclasses.fields(BuildInputs)}  # none left out
    keys = {INPUTS.key()} | {dataclasses.replace(INPUTS, **{name: value}).key() for name, value in CHANGES.items()}
    assert len(keys) == 1 + len(CHANGES)


def test_gcc_target_table_parses_to_the_enabled_options():
    table = """The following options are target specific:
  -m64                        		[enabled]
  -m3dnow                     		[disabled]
  -mabi=                      		sysv
  -march=                     		rocketlake
  -mavx512f                   		[enabled]
  -mcpu=                      		
  -mfused-madd                		-ffp-contract=fast
"""
    assert parse_target_help(table) == ("-m64", "-mabi=sysv", "-march=rocketlake", "-mavx512f", "-mcpu=",
                                        "-mfused-madd -ffp-contract=fast")


def test_cpu_flags_from_cpuinfo_when_the_compiler_cannot_say(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: sse2 avx512f avx2\n\nprocessor\t: 1\nflags\t\t: sse2 avx512f avx2\n")
    assert cpuinfo_flags(cpuinfo) == ("cpuinfo", "avx2", "avx512f", "sse2")
    if Path("/proc/cpuinfo").exists():  # `false` resolves nothing: the CPU's own flags stand in
        assert cpu_target(shutil.which("false"))[0] == "cpuinfo"


@needs_native
def test_probe_names_this_compiler_and_cpu():
    inputs = probe(("-O3", "-march=native"), ())
    assert os.path.isabs(inputs.compiler) and os.path.realpath(inputs.compiler) == inputs.compiler
    assert inputs.compiler_version
    assert any(option.startswith("-march=") and option != "-march=native" for option in inputs.cpu_target) \
        or inputs.cpu_target[0] == "cpuinfo"
    import torch

    assert inputs.torch == torch.__version__


def test_no_compiler_fails_the_build_and_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("HISPEC_NATIVE_DIR", str(tmp_path / "cache"))
    with pytest.raises(NativeBuildError, match="no C\\+\\+ compiler"):
        build_layer_stack()
    assert main(["build"]) == 1
    assert "no C++ compiler" in capsys.readouterr().err


def test_the_runtime_falls_back_with_a_warning(tmp_path, monkeypatch, caplog):
    """Not disabled, not buildable: the Python loop runs, and the log says why."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("HISPEC_NATIVE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="hispec.model.native"):
        assert native._load_or_warn() is None
    assert "decoder layers run in Python" in caplog.text and "no C++ compiler" in caplog.text


def test_hispec_native_0_turns_it_off_silently(monkeypatch, caplog):
    monkeypatch.setenv("HISPEC_NATIVE", "0")
    with caplog.at_level(logging.WARNING):
        assert native.layer_stack_module() is None
    assert not caplog.records


@needs_native
@pytest.mark.timeout(180)
def test_build_command_finishes_a_build_a_killed_one_left_behind(tmp_path):
    """A copy of this machine's build, as a killed build leaves it: no `inputs.json` (not marked
    finished) and torch's lock file still there. The command removes the stale lock instead of
    waiting on it forever, finishes the build (the compiled objects are up to date: no compile)
    and marks it; the next run loads it."""
    built = build_layer_stack()
    copy = tmp_path / built.library.parent.name
    shutil.copytree(built.library.parent, copy)
    (copy / "inputs.json").unlink()
    (copy / "lock").touch()

    def command():
        env = {**os.environ, "HISPEC_NATIVE_DIR": str(tmp_path)}
        return subprocess.run([sys.executable, "-m", "hispec.model.native", "build"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=150)

    first, second = command(), command()
    assert first.returncode == 0, first.stderr
    assert "C++ layer stack built in" in first.stdout and str(copy) in first.stdout and "removing" in first.stderr
    assert not (copy / "lock").exists() and (copy / "inputs.json").exists()
    assert second.returncode == 0, second.stderr
    assert "already built" in second.stdout and str(copy / built.library.name) in second.stdout
