"""The C++ layer stack (csrc/layer_stack.cpp), built on first use with torch's JIT extension
builder and cached on disk (`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions).

The first build takes about 40 s on a 2-core CPU (a file lock keeps concurrent processes from
building twice); later loads take milliseconds. Without a C++ compiler or ninja, or with
`HISPEC_NATIVE=0`, `layer_stack_module()` returns None and the model keeps its Python layer loop,
which computes the same thing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCE = CSRC / "layer_stack.cpp"
DISABLE_ENV = "HISPEC_NATIVE"


def native_enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1") != "0"


@functools.cache
def layer_stack_module() -> ModuleType | None:
    """The compiled extension, or None (with a warning saying why) when it cannot be built."""
    if not native_enabled():
        return None
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        log.warning("no C++ compiler found: decoder layers run in Python (slower, same results)")
        return None
    with _ninja_on_path():
        try:
            cpp_extension.verify_ninja_availability()
        except RuntimeError:
            log.warning("ninja not found: decoder layers run in Python (slower, same results)")
            return None
        # -march=native: the extension is built on the machine that runs it (AVX-512 here).
        # -fopenmp: at::parallel_for splits work only when the caller is compiled with OpenMP
        # (else it runs serially); libgomp resolves to the copy torch already loaded, so the
        # kernels share torch's intra-op thread pool. A compiler without OpenMP gets a serial build.
        for suffix, openmp in (("", ["-fopenmp"]), ("_serial", [])):
            try:
                return cpp_extension.load(
                    name=_versioned_name() + suffix,
                    sources=[str(SOURCE)],
                    extra_cflags=["-O3", "-march=native", *openmp],
                    extra_ldflags=openmp,
                    extra_include_paths=[str(CSRC)],
                )
            except Exception as exc:  # a broken toolchain must not take the runtime down
                log.warning("building the C++ layer stack%s failed: %s", " with OpenMP" if openmp else "", exc)
        log.warning("decoder layers run in Python (slower, same results)")
        return None


def _versioned_name() -> str:
    """torch's builder rebuilds when the listed sources change, not when a header does: the
    name carries a digest of every file in csrc/, so an edit anywhere builds a new module."""
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return f"hispec_native_{digest.hexdigest()[:12]}"


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
