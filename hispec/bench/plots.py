"""PNG plots of a benchmark's results.json (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _pipelined(name: str) -> bool:
    """A `<method>-pp<S>` row of `hispec bench --pipeline-stages S`."""
    return "-pp" in name


def tokens_per_second(results: dict, path: Path) -> None:
    methods = results["methods"]
    names = list(methods)
    speeds = [methods[n]["tokens_per_s"] for n in names]
    predicted = [methods[n].get("predicted_tokens_per_s") for n in names]
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(names)), 4))
    colors = ["#c44e52" if not methods[n]["identical_to_ar"] else "#55a868" if _pipelined(n) else "#4c72b0"
              for n in names]
    bars = ax.bar(names, speeds, color=colors)
    for name_index, value in enumerate(predicted):
        if value:
            ax.plot([name_index - 0.4, name_index + 0.4], [value, value], color="black", linestyle="--", linewidth=1)
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("tokens / s (median)")
    stages = results["config"].get("pipeline_stages", 1)
    pipelined = f"; green: {stages} pipeline stages" if stages > 1 else ""
    ax.set_title(f"batch 1, {results['config']['num_prompts']} prompts x {results['config']['max_new_tokens']} tokens "
                 f"(dashed: the cost model's prediction{pipelined})", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def acceptance(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, entry in results["methods"].items():
        levels = entry.get("acceptance") or {}
        if levels and not _pipelined(name):  # a pipelined row accepts what its single-process method does
            ax.plot(list(levels), list(levels.values()), marker="o", label=f"{name} ({entry.get('hierarchy', '')})")
    ax.set_xlabel("verifying exit layer")
    ax.set_ylabel("acceptance rate of proposals")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def throughput_vs_batch(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    by_batch = results["batch_sizes"]
    sizes = sorted(int(b) for b in by_batch)
    names = sorted({m for entry in by_batch.values() for m in entry})
    colors = {}
    for name in names:
        base = name.split("-pp")[0]
        color = colors.setdefault(base, f"C{len(colors)}")
        ax.plot(sizes, [by_batch[str(b)][name]["tokens_per_s"] for b in sizes], marker="o", label=name, color=color,
                linestyle="--" if _pipelined(name) else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens / s (median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def predicted_vs_measured(rows: list[dict], spearman: float | None, path: Path) -> None:
    """`hispec tune`'s candidates: the cost model's predicted tokens/s against one measured run each."""
    fig, ax = plt.subplots(figsize=(6, 5))
    for method, color in (("layerskip", "C0"), ("hispec", "C1")):
        points = [(r["predicted_tokens_per_s"], r["measured_tokens_per_s"]) for r in rows
                  if r["method"] == method and r["predicted_tokens_per_s"] is not None]
        if points:
            ax.scatter(*zip(*points), s=14, color=color, label=method)
    ax.set_xlabel("predicted tokens / s (cost model)")
    ax.set_ylabel("measured tokens / s (one run)")
    rho = "n/a" if spearman is None else f"{spearman:.2f}"
    ax.set_title(f"tune candidates: Spearman rank correlation {rho}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def heatmap(grid: dict, exits_x: list[int], exits_y: list[int], path: Path, title: str,
            xlabel: str = "draft exit layer e0", ylabel: str = "verifier exit layer e1") -> None:
    """grid[(x, y)] -> value (default: draft exit, verifier exit); cells missing from grid are blank."""
    import numpy as np

    values = np.full((len(exits_y), len(exits_x)), np.nan)
    for (x, y), value in grid.items():
        values[exits_y.index(y), exits_x.index(x)] = value
    fig, ax = plt.subplots(figsize=(7, 5))
    image = ax.imshow(values, origin="lower", cmap="viridis")
    for i in range(len(exits_y)):
        for j in range(len(exits_x)):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.0f}", ha="center", va="center", color="white", fontsize=8)
    ax.set_xticks(range(len(exits_x)), exits_x)
    ax.set_yticks(range(len(exits_y)), exits_y)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, label="tokens / s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TIMELINE_COLORS = {"busy": "#55a868", "transport": "#dd8452", "idle": "#d9d9d9"}


def timeline(report: dict, path: Path, title: str = "", zoom_ms: float = 20.0) -> None:
    """One lane per process of a pipeline (stage 0 at the top, ..., the driver at the bottom) over
    a window of `hispec.pipeline.timeline.window_report`: busy / transport / idle intervals, x in ms
    from the window's start, each lane labelled with its shares of the window; below, the window's
    first `zoom_ms` magnified (a step is a few ms: the whole window shows the pattern, the zoom the steps)."""
    from matplotlib.patches import Patch

    lanes, length = report["lanes"], report["window"]["length_ms"]
    zoom = min(zoom_ms, length)
    fig, (whole, detail) = plt.subplots(2, 1, figsize=(13, 2.0 + 1.3 * len(lanes)))
    labels = [f"{lane['lane']}" + (f" {lane['layers']}" if "layers" in lane else "") + "\n"
              + " / ".join(f"{lane['shares'][k]:.0%}" for k in TIMELINE_COLORS) for lane in lanes]
    for ax, end in ((whole, length), (detail, zoom)):
        for row, lane in enumerate(lanes):
            y = len(lanes) - 1 - row
            for kind, color in TIMELINE_COLORS.items():
                bars = [(start, stop - start) for k, start, stop in lane["intervals"] if k == kind and start < end]
                if bars:
                    ax.broken_barh(bars, (y - 0.38, 0.76), facecolors=color, edgecolors="none")
        ax.set_yticks(range(len(lanes)), labels[::-1], fontsize=8)
        ax.set_xlim(0, end)
        ax.set_ylim(-0.6, len(lanes) - 0.4)
    whole.axvspan(0, zoom, color="black", alpha=0.08, linewidth=0)
    whole.set_title(title + "\n(lane labels: busy / transport / idle shares of the window; shaded: magnified below)",
                    fontsize=9, loc="left")
    detail.set_title(f"the first {zoom:.0f} ms", fontsize=9, loc="left")
    detail.set_xlabel("ms from the window's start (CLOCK_MONOTONIC, shared by every process)")
    whole.legend(handles=[Patch(color=c, label=k) for k, c in TIMELINE_COLORS.items()], loc="lower right",
                 bbox_to_anchor=(1, 1.0), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
