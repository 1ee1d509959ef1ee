"""`hispec bench-transport`: what one round trip between two pipeline processes costs, by transport.

    hispec bench-transport                          # writes docs/pipeline/transport.json and .png

Two Ray actors A and B on a local Ray instance started for the command (one torch thread each,
as pipeline stages run). A times round trips to B, B answers:
  - gloo p2p: A sends a float32 tensor over a torch.distributed gloo group (the pipeline's own
    `hispec.engine.transport.Transport`, data group: A is stage 0, B stage 1), B receives it into
    a new tensor and sends it back: how the pipeline moves hidden rows;
  - gloo control: A sends a pickled one-feed `StepPlan` over the control group, B answers a
    pickled head output: the pipeline's per-step plan and reply;
  - ray call: A calls `B.echo(tensor)` and `ray.get`s the tensor it returns: an actor call per hop;
  - ray call, no argument: `ray.get(B.ping.remote())`, Ray's floor per call.
Tensors [1, 1, 256] (one decode token of the bundled model), [1, 5, 256] (a verification) and
[8, 4, 256] (a batch of 8). `--warmup` round trips each first, then `--repeats` in `--rounds`
interleaved rounds (every transport and shape in turn, as `hispec bench` interleaves methods:
a busy moment of a shared machine falls on all of them); medians, p90 and minimum.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import platform
import statistics
import time
from pathlib import Path

import ray
import torch

SHAPES = ((1, 1, 256), (1, 5, 256), (8, 4, 256))
GLOO, CONTROL, RAY, RAY_EMPTY = "gloo p2p", "gloo control (plan + reply)", "ray call", "ray call, no argument"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hispec bench-transport", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed round trips per transport and shape")
    parser.add_argument("--warmup", type=int, default=20, help="untimed round trips first")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds the repeats are spread over")
    parser.add_argument("--out", type=Path, default=Path("docs/pipeline/transport.json"),
                        help="JSON path; the plot is written beside it as .png")
    return parser


def _plan_and_reply():
    """A one-token draft step's control messages, as the pipeline pickles them."""
    from hispec.engine.plan import Feed, Forward, HeadOutput, RingKey, StepPlan

    plan = StepPlan(forwards=(Forward(0, 2, feeds=(Feed(0, 17, 1, 1, (42,)),), output_ring=RingKey(2, 5)),))
    return plan, {0: {0: HeadOutput([42])}}


@ray.remote(num_cpus=0.5)
class Peer:
    """One end: rank 1 (A, stage 0, hosts the rendezvous store) or rank 2 (B, stage 1)."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.transport = self._store = None

    def host_store(self, world_size: int):
        from hispec.engine.transport import GroupAddress, host_store

        host = ray.util.get_node_ip_address()
        self._store, port = host_store(world_size, host)
        return GroupAddress(host, port, world_size, "gloo")

    def join(self, address, rank: int) -> int:
        from hispec.engine.transport import Transport

        self.transport = Transport(address, rank, self._store)
        return rank

    def ping(self) -> None:
        return None

    def echo(self, tensor):
        return tensor

    # ---- B: answer n round trips ---------------------------------------------------------------
    def gloo_echo(self, shape, n: int) -> None:
        for _ in range(n):
            tensor = self.transport.recv_tensor(shape, torch.float32, torch.device("cpu"), 0)
            self.transport.send_tensor(tensor, 0)

    def control_echo(self, n: int) -> None:
        _, reply = _plan_and_reply()
        for _ in range(n):
            self.transport.recv_object(1)
            self.transport.send_object(reply, 1)

    # ---- A: time n round trips (seconds each) ----------------------------------------------------
    def gloo_round_trips(self, shape, n: int) -> list[float]:
        tensor, seconds = torch.randn(shape), []
        for _ in range(n):
            started = time.perf_counter()
            self.transport.send_tensor(tensor, 1)
            self.transport.recv_tensor(shape, torch.float32, torch.device("cpu"), 1)
            seconds.append(time.perf_counter() - started)
        return seconds

    def control_round_trips(self, n: int) -> list[float]:
        plan, _ = _plan_and_reply()
        seconds = []
        for _ in range(n):
            started = time.perf_counter()
            self.transport.send_object(plan, 2)
            self.transport.recv_object(2)
            seconds.append(time.perf_counter() - started)
        return seconds

    def ray_round_trips(self, peer, shape, n: int) -> list[float]:
        tensor, seconds = (torch.randn(shape) if shape else None), []
        for _ in range(n):
            started = time.perf_counter()
            ray.get(peer.echo.remote(tensor) if shape else peer.ping.remote())
            seconds.append(time.perf_counter() - started)
        return seconds

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def payload_bytes(transport: str, shape) -> int:
    """Bytes sent each way: the tensor's, or the pickled plan's for the control round trip."""
    if transport == CONTROL:
        return len(pickle.dumps(_plan_and_reply()[0], protocol=pickle.HIGHEST_PROTOCOL))
    return 4 * math.prod(shape) if shape else 0


def summarize(transport: str, shape, rounds: list[list[float]]) -> dict:
    """Round trips in milliseconds over all rounds, and each round's median (a shared machine's
    other work shows as rounds apart from the rest)."""
    ms = [1000 * s for seconds in rounds for s in seconds]
    return {"transport": transport, "shape": list(shape) if shape else None,
            "bytes": payload_bytes(transport, shape), "repeats": len(ms),
            "median_ms": round(statistics.median(ms), 4), "p90_ms": round(statistics.quantiles(ms, n=10)[8], 4),
            "mean_ms": round(statistics.fmean(ms), 4), "min_ms": round(min(ms), 4),
            "round_medians_ms": [round(1000 * statistics.median(seconds), 3) for seconds in rounds]}


CASES = [(GLOO, s) for s in SHAPES] + [(CONTROL, None)] + [(RAY, s) for s in SHAPES] + [(RAY_EMPTY, None)]


def round_trips(a, b, case: tuple[str, tuple | None], n: int) -> list[float]:
    """n round trips of one transport (and tensor shape) from actor `a` to actor `b`, timed in `a`."""
    transport, shape = case
    if transport == GLOO:
        answering, timing = b.gloo_echo.remote(shape, n), a.gloo_round_trips.remote(shape, n)
    elif transport == CONTROL:
        answering, timing = b.control_echo.remote(n), a.control_round_trips.remote(n)
    else:
        answering, timing = None, a.ray_round_trips.remote(b, shape, n)
    seconds = ray.get(timing, timeout=120)
    if answering is not None:
        ray.get(answering, timeout=120)
    return seconds


def measure(repeats: int, warmup: int, rounds: int) -> list[dict]:
    """Every transport's round trips between two fresh actors (needs ray.init in this process)."""
    from hispec.engine.transport import Transport

    a, b = Peer.remote(), Peer.remote()
    address = ray.get(a.host_store.remote(3))  # ranks: 0 this process (control group only), 1 A, 2 B
    joined = [a.join.remote(address, 1), b.join.remote(address, 2)]
    driver = Transport(address, 0)  # the groups form once all three ranks are in
    ray.get(joined, timeout=120)
    seconds = {case: [] for case in CASES}
    try:
        for case in CASES:
            round_trips(a, b, case, warmup)
        for _ in range(rounds):
            for case in CASES:
                seconds[case].append(round_trips(a, b, case, math.ceil(repeats / rounds)))
    finally:
        ray.get([a.close.remote(), b.close.remote()])
        driver.close()
    return [summarize(transport, shape, seconds[(transport, shape)]) for transport, shape in CASES]


def ratios(rows: list[dict]) -> dict:
    """Per tensor shape: ray call median / gloo p2p median."""
    by = {(r["transport"], str(r["shape"])): r["median_ms"] for r in rows}
    return {str(list(s)): round(by[(RAY, str(list(s)))] / by[(GLOO, str(list(s)))], 2) for s in SHAPES}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [f"[{','.join(map(str, s))}] fp32\n{4 * math.prod(s) // 1024} KiB" for s in SHAPES]
    groups.append("no tensor:\npickled plan + reply / no argument")
    series = {GLOO: [r for r in rows if r["transport"] == GLOO] + [next(r for r in rows if r["transport"] == CONTROL)],
              RAY: [r for r in rows if r["transport"] == RAY] + [next(r for r in rows if r["transport"] == RAY_EMPTY)]}
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.38
    for i, (name, items) in enumerate(series.items()):
        xs = [g + (i - 0.5) * width for g in range(len(groups))]
        medians = [r["median_ms"] for r in items]
        upper = [r["p90_ms"] - r["median_ms"] for r in items]
        label = f"{name} (last group: {CONTROL if name == GLOO else RAY_EMPTY})"
        bars = ax.bar(xs, medians, width, yerr=[[0] * len(items), upper], capsize=3, label=label,
                      color="#4c72b0" if name == GLOO else "#dd8452")
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
        ax.scatter(xs, [r["min_ms"] for r in items], marker="_", s=200, color="black", zorder=3,
                   label="minimum" if i else None)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel("round trip, ms (median; whisker: p90)")
    repeats = rows[0]["repeats"]
    ax.set_title(f"two Ray actors on one machine, {repeats} round trips each (interleaved): send + reply", fontsize=9)
    ax.set_ylim(0, 1.4 * max(r["p90_ms"] for r in rows))
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 10 or args.warmup < 1 or not 1 <= args.rounds <= args.repeats:
        raise SystemExit("--repeats must be >= 10, --warmup >= 1 and --rounds in [1, repeats]")
    from hispec.pipeline.local import local_ray

    started, load_before = time.perf_counter(), os.getloadavg()
    with local_ray():
        rows = measure(args.repeats, args.warmup, args.rounds)
    results = {
        "config": {"repeats": args.repeats, "warmup": args.warmup, "rounds": args.rounds, "threads_per_actor": 1,
                   "cores": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
                   "python": platform.python_version(), "seconds": round(time.perf_counter() - started, 1),
                   # 1-minute load average before and after: how busy the machine was
                   "load_average": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                   "command": "hispec bench-transport " + " ".join(argv if argv is not None else [])},
        "results": rows,
        "ray_call_over_gloo_p2p": ratios(rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    for r in rows:
        shape = "x".join(map(str, r["shape"])) if r["shape"] else "-"
        print(f"{r['transport']:28} {shape:>8} {r['bytes']:>6} B  median {r['median_ms']:7.3f} ms  "
              f"p90 {r['p90_ms']:7.3f} ms  min {r['min_ms']:6.3f} ms  "
              f"round medians {min(r['round_medians_ms']):.3f}..{max(r['round_medians_ms']):.3f} ms")
    print("ray call / gloo p2p (median):", json.dumps(results["ray_call_over_gloo_p2p"]))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {results['config']['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
