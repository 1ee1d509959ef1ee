"""What `hispec loadtest` writes: the JSON summary of a run (`report`) and its figure (`plot`)."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from hispec.bench.latency import summary
from hispec.bench.server_memory import Snapshot

if TYPE_CHECKING:
    from hispec.bench.loadtest import Outcome, Planned, Run

MB = 1024 * 1024


def _timing(outcomes: list[Outcome]) -> dict:
    """Latency (and for streams TTFT, time per output token, gaps between messages) of completed requests."""
    replies = [o.reply for o in outcomes if o.reply is not None]
    streams = [o.reply for o in outcomes if o.reply is not None and o.planned.kind.endswith("-stream")]
    return {
        "latency_s": summary([r.latency_s for r in replies]),
        "ttft_s": summary([r.ttft_s for r in streams]),
        "time_per_output_token_s": summary([t for r in streams if (t := r.time_per_output_token_s) is not None]),
        "inter_message_gap_s": summary([gap for r in streams for gap in r.message_gaps_s]),
    }


def _counts(outcomes: list[Outcome]) -> dict:
    return {"ok": sum(o.reply is not None for o in outcomes), "failed": sum(o.error is not None for o in outcomes),
            "cancelled_at_time_limit": sum(o.cancelled for o in outcomes)}


def greedy_consistency(outcomes: list[Outcome]) -> dict:
    """Greedy outputs of one prompt must be prefixes of its longest output, whatever the protocol,
    mode, length or batch they ran in."""
    by_prompt: dict[int, list[tuple[int, ...]]] = defaultdict(list)
    for o in outcomes:
        if o.reply is not None:
            by_prompt[o.planned.prompt_index].append(o.reply.token_ids)
    compared = {p: ids for p, ids in by_prompt.items() if len(ids) > 1}
    mismatched = sorted(p for p, outputs in compared.items()
                        if any(ids != max(outputs, key=len)[:len(ids)] for ids in outputs))
    return {"prompts_with_several_requests": len(compared), "requests_compared": sum(map(len, compared.values())),
            "mismatched_prompts": mismatched}


def _memory(how: str, before: Snapshot, after: Snapshot, samples: list[tuple[float, int]]) -> dict:
    pids = sorted(set(before.processes) | set(after.processes))
    peak = max([before.total_bytes, after.total_bytes] + [rss for _, rss in samples])
    return {
        "processes_from": how,
        "before_mb": round(before.total_bytes / MB, 1), "after_mb": round(after.total_bytes / MB, 1),
        "peak_mb": round(peak / MB, 1),
        "growth_pct": round(100 * (after.total_bytes / before.total_bytes - 1), 2) if before.total_bytes else None,
        "processes": [{"pid": pid, "title": (before.processes.get(pid) or after.processes[pid])[0][:80],
                       "before_mb": round(before.processes[pid][1] / MB, 1) if pid in before.processes else None,
                       "after_mb": round(after.processes[pid][1] / MB, 1) if pid in after.processes else None}
                      for pid in pids],
    }


def _timeline(run: Run) -> dict:
    """Per bin (1 s, or about 40 over a long run): requests completed and tokens received; RSS samples."""
    wall = max(run.ended - run.started, 1e-9)
    bin_s = max(1.0, round(wall / 40, 1))
    bins = int(wall // bin_s) + 1
    completed, tokens = [0] * bins, [0] * bins
    for o in run.outcomes:
        if o.reply is not None:
            completed[min(bins - 1, int((o.reply.finished - run.started) // bin_s))] += 1
    for at, count in run.arrivals:
        tokens[min(bins - 1, int((at - run.started) // bin_s))] += count
    return {"bin_s": bin_s, "requests_completed": completed, "tokens": tokens,
            "rss_mb": [[round(at - run.started, 2), round(rss / MB, 1)] for at, rss in run.rss]}


def report(config: dict, plan: list[Planned], run: Run, memory_from: str, before: Snapshot, after: Snapshot,
           greedy: bool) -> dict:
    outcomes = sorted(run.outcomes, key=lambda o: o.planned.index)
    wall = run.ended - run.started
    errors: dict[str, Counter] = {"grpc": Counter(), "http": Counter()}
    examples: dict[str, str] = {}
    for o in outcomes:
        if o.error is not None:
            errors[o.error.protocol][o.error.code] += 1
            examples.setdefault(f"{o.error.protocol} {o.error.code}", o.error.message[:300])
    by_kind = defaultdict(list)
    by_length = defaultdict(list)
    for o in outcomes:
        by_kind[o.planned.kind].append(o)
        by_length[o.planned.max_tokens].append(o)
    counts = {"planned": len(plan), "issued": len(outcomes), **_counts(outcomes),
              "not_issued": len(plan) - len(outcomes)}
    results = {
        "config": config,
        "counts": counts,
        "errors": {protocol: dict(codes) for protocol, codes in errors.items()},
        "error_examples": examples,
        "wall_s": round(wall, 3),
        "throughput": {"requests_per_s": round(counts["ok"] / wall, 2),
                       "tokens_per_s": round(sum(c for _, c in run.arrivals) / wall, 1),
                       "tokens_received": sum(c for _, c in run.arrivals)},
        **_timing(outcomes),
        "by_kind": {kind: {**_counts(group), **_timing(group)} for kind, group in sorted(by_kind.items())},
        "by_max_tokens": {str(n): {**_counts(group), "latency_s": _timing(group)["latency_s"]}
                          for n, group in sorted(by_length.items())},
        "server_memory": _memory(memory_from, before, after, run.rss),
        "timeline": _timeline(run),
        "requests": [{"index": o.planned.index, "kind": o.planned.kind, "prompt": o.planned.prompt_index,
                      "max_tokens": o.planned.max_tokens, "issued_s": round(o.issued_at - run.started, 4),
                      **({"tokens": len(o.reply.token_ids), "latency_s": round(o.reply.latency_s, 4),
                          "ttft_s": round(o.reply.ttft_s, 4)} if o.reply else {}),
                      "status": "ok" if o.reply else "cancelled" if o.cancelled else
                      f"{o.error.protocol} {o.error.code}"} for o in outcomes],
    }
    if greedy:
        results["greedy_consistency"] = greedy_consistency(outcomes)
    return results


def plot(results: dict, path: Path) -> None:
    """Four panels: latency CDF by kind, throughput over time, time to first output of streams, server RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in results["requests"] if r["status"] == "ok"]
    kinds = sorted({r["kind"] for r in results["requests"]})
    colors = {kind: f"C{i}" for i, kind in enumerate(("grpc-stream", "grpc-unary", "http-stream", "http-unary"))}
    fig, ((lat, thr), (ttft, mem)) = plt.subplots(2, 2, figsize=(12, 8))

    def cdf(ax, key: str, kinds_: list[str]) -> None:
        for kind in kinds_:
            values = sorted(r[key] for r in records if r["kind"] == kind)
            if values:
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post",
                        color=colors.get(kind), label=f"{kind} ({len(values)})")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8, loc="lower right")

    cdf(lat, "latency_s", kinds)
    overall = results["latency_s"]
    if overall:
        for q, style in (("p50", ":"), ("p95", "--"), ("p99", "-.")):
            lat.axvline(overall[q], color="gray", linestyle=style, linewidth=1)
            lat.text(overall[q], 1.0, f" {q}", fontsize=7, color="gray", rotation=90, va="top")
    lat.set_xlabel("latency (s), completed requests")
    lat.set_title("latency by kind (gray: p50 / p95 / p99 of all)", fontsize=9)

    timeline = results["timeline"]
    bin_s = timeline["bin_s"]
    starts = [i * bin_s for i in range(len(timeline["tokens"]))]
    thr.bar(starts, [t / bin_s for t in timeline["tokens"]], width=bin_s, align="edge", color="#4c72b0", alpha=0.7)
    thr.set_xlabel("time since start (s)")
    thr.set_ylabel("tokens / s received", color="#4c72b0")
    done = thr.twinx()
    done.plot([s + bin_s / 2 for s in starts], [c / bin_s for c in timeline["requests_completed"]],
              color="#c44e52", marker=".", linewidth=1)
    done.set_ylabel("requests / s completed", color="#c44e52")
    t = results["throughput"]
    thr.set_title(f"throughput: {t['tokens_per_s']:.0f} tokens/s, {t['requests_per_s']:.1f} requests/s overall",
                  fontsize=9)

    cdf(ttft, "ttft_s", [k for k in kinds if k.endswith("-stream")])
    ttft.set_xlabel("time to first output (s), streams")
    tpot = results["time_per_output_token_s"]
    ttft.set_title("time to first output" + (f" (then {1000 * tpot['p50']:.1f} ms / token, p50)" if tpot else ""),
                   fontsize=9)

    memory = results["server_memory"]
    samples = timeline["rss_mb"]
    if samples:
        mem.plot([s for s, _ in samples], [mb for _, mb in samples], marker=".", color="#55a868")
    mem.axhline(memory["before_mb"], color="gray", linestyle=":", linewidth=1)
    mem.set_xlabel("time since start (s)")
    mem.set_ylabel("server RSS (MB), Serve processes")
    mem.ticklabel_format(axis="y", useOffset=False)
    mem.grid(alpha=0.3)
    growth = f"{memory['growth_pct']:+.1f}%" if memory["growth_pct"] is not None else "n/a"
    mem.set_title(f"server memory: {memory['before_mb']:.0f} -> {memory['after_mb']:.0f} MB ({growth}), "
                  f"peak {memory['peak_mb']:.0f} MB", fontsize=9)

    c = results["counts"]
    errors = ", ".join(f"{p} {code}: {n}" for p, codes in results["errors"].items() for code, n in codes.items())
    cfg = results["config"]
    fig.suptitle(f"hispec loadtest: {c['planned']} requests, concurrency {cfg['concurrency']}, max tokens "
                 f"{','.join(map(str, cfg['max_tokens']))}: {c['ok']} ok, {c['failed']} failed"
                 f"{' (' + errors + ')' if errors else ''}, {c['cancelled_at_time_limit']} cancelled, "
                 f"{c['not_issued']} not issued", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
