"""Percentiles of measured times, as the serving benchmarks report them."""

from __future__ import annotations


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank of the sorted values; `values` must not be empty."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(values: list[float], digits: int = 4) -> dict | None:
    """count, mean, p50/p95/p99 and max of `values`; None when there are none."""
    if not values:
        return None
    return {"count": len(values), "mean": round(sum(values) / len(values), digits),
            **{f"p{q}": round(percentile(values, q), digits) for q in (50, 95, 99)},
            "max": round(max(values), digits)}
