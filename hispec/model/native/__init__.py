"""The C++ layer stack (hispec/model/csrc/): decoder layers and the exit head without the Python
interpreter between ops (docs/runtime.md).

It is built at install time (`scripts/bootstrap.sh`, which the README's commands run, calls
`python -m hispec.model.native build`: about 40 s on a 2-core CPU, once per machine) and cached by
sources + compiler + CPU + flags + torch (`key.py`, `build.py`), so a process loads it in
milliseconds and a build made for another CPU is never loaded. A process that finds no build for
its machine builds it on first use (logged).

`HISPEC_NATIVE=0` chooses the Python layer loop (same results to fp32 rounding, slower), silently.
Otherwise, when the build fails, the runtime still falls back to the Python loop, with a warning
saying why; the build command and the test suite fail instead.
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

from hispec.model.native.build import Build, build_layer_stack, cache_root
from hispec.model.native.key import BuildInputs, NativeBuildError

__all__ = ["Build", "BuildInputs", "NativeBuildError", "build_layer_stack", "cache_root",
           "layer_stack_module", "native_enabled"]

log = logging.getLogger(__name__)

DISABLE_ENV = "HISPEC_NATIVE"


def native_enabled() -> bool:
    """False when `HISPEC_NATIVE=0`: the Python layer loop was chosen (read on every call)."""
    return os.environ.get(DISABLE_ENV, "1") != "0"


def layer_stack_module() -> ModuleType | None:
    """The compiled extension, or None: with HISPEC_NATIVE=0, or (with a warning) when it cannot
    be built here."""
    if not native_enabled():
        return None
    return _process_module()


@functools.cache
def _process_module() -> ModuleType | None:
    """Built or loaded once per process; a failure is not retried (and warned about once)."""
    return _load_or_warn()


def _load_or_warn() -> ModuleType | None:
    try:
        build = build_layer_stack()
    except NativeBuildError as exc:
        log.warning("the C++ layer stack does not build here, so decoder layers run in Python (slower, "
                    "same results; HISPEC_NATIVE=0 chooses this without a warning):\n%s", exc)
        return None
    if not build.openmp:
        log.warning("the C++ layer stack was built without OpenMP: its kernels run on one thread")
    return build.module
