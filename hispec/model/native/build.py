"""Builds the C++ layer stack with torch's extension builder into a cache directory named by its
`BuildInputs` key, or loads the finished build from there.

Where: `HISPEC_NATIVE_DIR` if set; else, in a virtual environment, `<venv>/hispec-native` (for the
README's commands `.venv/hispec-native`): every process that runs the venv's python finds it with
no setting to carry along (`serve run`, Ray workers, the engine processes spawned with the same
interpreter), it goes with the venv whose torch it links against, and it is removed with it.
Outside a venv, `$XDG_CACHE_HOME/hispec-native` (default ~/.cache/hispec-native).

A finished build is marked by `inputs.json` (written after it loaded) and is then imported
directly: no compiler, no ninja, no mtime check that could rebuild it at a replica's start. Two
processes never build the same key at once: an flock on the build directory serializes them (the
second one then finds the finished build), and torch's own lock file inside stays; the flock is
released by the kernel when its holder dies, so a build killed halfway leaves torch's lock file
behind as a stale file, which the next builder removes instead of waiting on it forever.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from hispec.model.native.key import CSRC, SOURCE, BuildInputs, NativeBuildError, probe

log = logging.getLogger(__name__)

DIR_ENV = "HISPEC_NATIVE_DIR"
BASE_CFLAGS = ("-O3", "-march=native")  # -march=native: built for the CPU that runs it (AVX-512 here)
# -fopenmp: at::parallel_for splits work only when the caller is compiled with OpenMP (else it runs
# serially); libgomp resolves to the copy torch already loaded, so the kernels share torch's
# intra-op thread pool. A compiler without OpenMP gets the serial build.
OPENMP = ("-fopenmp",)
VARIANTS = ((BASE_CFLAGS + OPENMP, OPENMP), (BASE_CFLAGS, ()))  # (cflags, ldflags), preferred first
LIB_SUFFIX = ".pyd" if os.name == "nt" else ".so"  # what torch's builder names the library

_loaded: dict[Path, ModuleType] = {}  # library path -> module: a library is imported once per process


@dataclasses.dataclass(frozen=True)
class Build:
    module: ModuleType
    library: Path
    inputs: BuildInputs
    origin: str  # "cache": a finished build was loaded; "compiled": by this call; "waited": for another process's build
    seconds: float  # probe + build or load

    @property
    def openmp(self) -> bool:
        return "-fopenmp" in self.inputs.cflags


def cache_root() -> Path:
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV]).expanduser()
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "hispec-native"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hispec-native"


def build_layer_stack(root: Path | None = None) -> Build:
    """The OpenMP build, else the serial one, from the cache or compiled now (about 40 s on the
    2-core CPU). Raises NativeBuildError with each attempt's reason (the compiler's output)."""
    root = cache_root() if root is None else root
    failures = []
    for cflags, ldflags in VARIANTS:
        start = time.perf_counter()
        inputs = probe(cflags, ldflags)  # no compiler: no other variant can do better
        try:
            module, library, origin = _build_or_load(inputs, root / inputs.module_name)
        except Exception as exc:  # the builder raises RuntimeError, OSError, ImportError, ...
            failures.append(f"with {' '.join(cflags)}: {exc}")
            log.warning("building the C++ layer stack with %s failed", " ".join(cflags))
            continue
        return Build(module, library, inputs, origin, time.perf_counter() - start)
    raise NativeBuildError("\n".join(failures))


def _build_or_load(inputs: BuildInputs, directory: Path) -> tuple[ModuleType, Path, str]:
    name = inputs.module_name
    library, marker = directory / f"{name}{LIB_SUFFIX}", directory / "inputs.json"
    if library in _loaded:
        return _loaded[library], library, "cache"
    if marker.exists():
        with contextlib.suppress(ImportError):
            return _import(name, library), library, "cache"
        log.warning("the build in %s does not load: building it again", directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _exclusive(directory / "hispec.lock"):
        if marker.exists():  # finished by another process while this one waited
            with contextlib.suppress(ImportError):
                return _import(name, library), library, "waited"
            marker.unlink()
            library.unlink(missing_ok=True)  # ninja would take a broken library for up to date
        stale = directory / "lock"  # torch's lock file; every builder holds the flock first
        if stale.exists():
            log.warning("removing %s, left by a build that was killed", stale)
            stale.unlink()
        log.warning("building the C++ layer stack in %s (about 40 s on 2 cores, once per machine; "
                    "scripts/bootstrap.sh does it at install time)", directory)
        module = _compile(inputs, name, directory)
        _write_atomically(marker, json.dumps(dataclasses.asdict(inputs), indent=2) + "\n")
    _loaded[library] = module
    return module, library, "compiled"


def _compile(inputs: BuildInputs, name: str, directory: Path) -> ModuleType:
    from torch.utils import cpp_extension

    with _ninja_on_path():
        cpp_extension.verify_ninja_availability()
        return cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=list(inputs.cflags),
            extra_ldflags=list(inputs.ldflags),
            extra_include_paths=[str(CSRC)],
            build_directory=str(directory),
        )


def _import(name: str, library: Path) -> ModuleType:
    """The library as a Python module, as torch's builder imports it (torch must be imported first:
    the extension links against it)."""
    import torch  # noqa: F401

    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"{library} is not a loadable extension")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _loaded[library] = module
    return module


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released on close, or by the kernel if this process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + f".{os.getpid()}.tmp")
    partial.write_text(text)
    os.replace(partial, path)


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """The `ninja` wheel (a dependency) puts its binary in the venv's bin/, which is not on PATH
    when the venv's python is run directly; torch's builder looks for it on PATH."""
    try:
        import ninja
    except ImportError:
        yield
        return
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join((ninja.BIN_DIR, old))
    try:
        yield
    finally:
        os.environ["PATH"] = old
