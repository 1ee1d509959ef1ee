"""What identifies a build of the C++ layer stack: its sources, the compiler, the CPU the code is
generated for (`-march=native`), the flags and the torch it links against.

A build's cache directory is named by a digest of all of these (`BuildInputs.key`), so a build is
only ever loaded where it was made for: a `-march=native` build made on another CPU (a shared home
directory, a container image built elsewhere) is not found there, and is built anew instead of
dying on an illegal instruction. Probing the machine costs two compiler runs (~50 ms).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SOURCE = CSRC / "layer_stack.cpp"


class NativeBuildError(RuntimeError):
    """The C++ layer stack cannot be built (or loaded) here; the message says why."""


@dataclasses.dataclass(frozen=True)
class BuildInputs:
    sources: str  # sha256 of every file in csrc/ (names and bytes): a header edit counts too
    compiler: str  # the compiler's resolved path (c++ -> g++-12)
    compiler_version: str  # its `--version` output
    cpu_target: tuple[str, ...]  # what -march=native means here (see `cpu_target`)
    cflags: tuple[str, ...]
    ldflags: tuple[str, ...]
    torch: str  # torch.__version__: the ABI the extension links against
    python: str  # interpreter ABI and machine, e.g. "cpython-311 x86_64"

    def key(self) -> str:
        """A digest of every field: equal inputs, equal key; any change, another key."""
        payload = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    @property
    def module_name(self) -> str:
        return f"hispec_native_{self.key()}"

    def summary(self) -> str:
        """One line for people: compiler, target CPU, flags, torch."""
        march = next((o for o in self.cpu_target if o.startswith("-march=")), "cpu " + self.key()[:6])
        version = self.compiler_version.splitlines()[0] if self.compiler_version else "?"
        return f"{version} ({self.compiler}), {march}, {' '.join(self.cflags)}, torch {self.torch}"


def probe(cflags: tuple[str, ...], ldflags: tuple[str, ...]) -> BuildInputs:
    """The inputs of a build with these flags on this machine, with the compiler torch's builder
    will use (`CXX`, default `c++`). Raises NativeBuildError when there is no working compiler."""
    import torch

    compiler = compiler_path()
    return BuildInputs(
        sources=source_digest(CSRC),
        compiler=compiler,
        compiler_version=_run(compiler, "--version"),
        cpu_target=cpu_target(compiler),
        cflags=tuple(cflags),
        ldflags=tuple(ldflags),
        torch=torch.__version__,
        python=f"{sys.implementation.cache_tag} {platform.machine()}",
    )


def compiler_path() -> str:
    name = os.environ.get("CXX", "c++")
    found = shutil.which(name)
    if found is None:
        raise NativeBuildError(f"no C++ compiler: {name!r} (from CXX, default c++) is not on PATH")
    return os.path.realpath(found)


def source_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def cpu_target(compiler: str) -> tuple[str, ...]:
    """The target options -march=native turns on for this CPU, as the compiler resolves them
    (gcc: `-march=native -Q --help=target`, e.g. -march=sapphirerapids, -mavx512f, ...); for a
    compiler that cannot say (clang), the CPU's feature flags from /proc/cpuinfo."""
    try:
        resolved = parse_target_help(_run(compiler, "-march=native", "-Q", "--help=target"))
    except NativeBuildError:
        resolved = ()
    return resolved or cpuinfo_flags()


def parse_target_help(text: str) -> tuple[str, ...]:
    """gcc's `-Q --help=target` table as options: "-mavx2" (enabled), "-march=rocketlake",
    "-mfpmath=sse"; disabled options are left out (the enabled set determines them)."""
    options = []
    for line in text.splitlines():
        name, _, value = line.strip().partition(" ")
        value = " ".join(value.split())
        if not name.startswith("-") or value == "[disabled]":
            continue
        if value == "[enabled]":
            options.append(name)
        elif name.endswith("="):
            options.append(name + value)
        else:
            options.append(f"{name} {value}".rstrip())
    return tuple(options)


def cpuinfo_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    try:
        for line in cpuinfo.read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() in ("flags", "Features"):  # x86, arm
                return ("cpuinfo", *sorted(value.split()))
    except OSError:
        pass
    return ("platform", platform.machine(), platform.processor())


def _run(*command: str) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NativeBuildError(f"{command[0]} does not run: {exc}") from exc
    if result.returncode != 0:
        raise NativeBuildError(f"`{' '.join(command)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip()
