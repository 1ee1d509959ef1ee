"""`python -m hispec.model.native build`: build the C++ layer stack for this machine now (or find
it built), print where it is and how long that took; exit 1 when it cannot be built.
scripts/bootstrap.sh runs it, so the README's commands build it at install time and fail loudly."""

from __future__ import annotations

import argparse
import logging
import sys

from hispec.model.native.build import build_layer_stack, cache_root
from hispec.model.native.key import NativeBuildError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hispec.model.native", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build the C++ layer stack (a cache hit when already built)")
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        build = build_layer_stack()
    except NativeBuildError as exc:
        print(f"cannot build the C++ layer stack in {cache_root()}:\n{exc}\n"
              "(HISPEC_NATIVE=0 runs the Python layer loop instead: same results, slower)", file=sys.stderr)
        return 1
    how = {"cache": "already built, loaded", "compiled": "built", "waited": "built by another process, loaded"}[build.origin]
    print(f"C++ layer stack {how} in {build.seconds:.2f} s: {build.library}")
    print(f"  for {build.inputs.summary()}")
    if not build.openmp:
        print("  without OpenMP (the compiler has none): its kernels run on one thread", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
