"""Generates the Python modules for `hispec.proto` (needs grpcio-tools, a dev dependency).

    python -m hispec.rpc.codegen            # rewrite hispec_pb2.py, hispec_pb2.pyi, hispec_pb2_grpc.py
    python -m hispec.rpc.codegen --check    # exit 1 if the committed modules are stale

The proto is compiled from the repository root so the generated modules import each other as
`hispec.rpc.hispec_pb2`: Ray Serve's gRPC proxy imports them by that name.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

RPC_DIR = Path(__file__).resolve().parent
ROOT = RPC_DIR.parent.parent
PROTO = RPC_DIR / "hispec.proto"
GENERATED = ("hispec_pb2.py", "hispec_pb2.pyi", "hispec_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Compile the proto into `out_root/hispec/rpc/`; returns the generated files."""
    from grpc_tools import protoc  # dev dependency, imported only when regenerating

    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"  # well-known types
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_root}", f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}", str(PROTO.relative_to(ROOT))]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return [out_root / "hispec" / "rpc" / name for name in GENERATED]


def stale_files() -> list[str]:
    """Generated modules that differ from what the proto produces now."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [path.name for path in fresh
                if not (RPC_DIR / path.name).is_file() or (RPC_DIR / path.name).read_bytes() != path.read_bytes()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report stale modules")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale: {', '.join(stale)}; run `python -m hispec.rpc.codegen`", file=sys.stderr)
            return 1
        print("generated modules are up to date")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            shutil.copyfile(path, RPC_DIR / path.name)
            print(f"wrote {RPC_DIR / path.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
