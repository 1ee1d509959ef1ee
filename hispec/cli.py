"""The `hispec` command: one subcommand per job, each module owns its own arguments."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv) -> int, one-line help)
SUBCOMMANDS = {
    "generate": ("hispec.generate", "generate text from prompts"),
    "bench": ("hispec.bench.speed", "every decoding method side by side: tokens/s, acceptance, cost model"),
    "bench-serve": ("hispec.bench.serving", "load a running server with concurrent gRPC streams: tokens/s, latency"),
    "loadtest": ("hispec.bench.loadtest", "bounded load on a local server over gRPC and HTTP: latency, errors, RSS"),
    "tune": ("hispec.bench.tune", "sweep exits and budgets; store the best hierarchy with the checkpoint"),
    "bench-runtime": ("hispec.bench.runtime", "runtime micro-benchmark vs transformers"),
    "bench-transport": ("hispec.bench.transport", "pipeline transport: gloo point-to-point vs Ray actor calls"),
    "train": ("hispec.train.recipe", "train an early-exit model (LayerSkip recipe)"),
    "eval-exits": ("hispec.train.evaluate", "agreement of each exit layer with the final layer"),
    "cluster": ("hispec.cluster", "KubeRay RayService / ray up: render serveConfigV2 from deploy/, validate offline"),
}


def usage() -> str:
    lines = ["usage: hispec <command> [args]", "", "commands:"]
    lines += [f"  {name:16} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "`hispec <command> --help` for a command's options"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in SUBCOMMANDS:
        print(f"hispec: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
