"""The cost model: a configuration's time per token, predicted from what its acceptance made it
run, priced with a cost table timed apart from the runs (hispec.bench.cost_table).

A run's acceptance statistics decide its forward log (`SpecEngine.forward_log`: forwards counted
by shape — layers, sequences, tokens per sequence, exit-head rows, vocabulary scored, prefill): a
method whose drafts are accepted more often runs fewer, wider target forwards and fewer rounds
per committed token. The prediction is

    predicted seconds = sum over shapes of count x (forward + head seconds from the table)
    predicted tokens/s = committed tokens / predicted seconds

No time of the predicted run enters it: the table was timed on the same model and machine, but
outside the measured runs. What it leaves out is everything outside the model's forwards
(scheduling, hidden-state buffers, decisions, Python; in a pipeline also transport), so a measured
speed below the prediction is that overhead plus the table's error. `hispec tune` checks the
model where it is used, in ranking: the Spearman rank correlation of predicted and measured speed
over its candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

from hispec.bench.cost_table import CostTable
from hispec.engine import ForwardShape


def predicted_seconds(table: CostTable, log: dict[ForwardShape, int]) -> float:
    """The time the forwards in `log` take at `table`'s rates (KeyError: a shape it lacks)."""
    return table.price(log)


def predicted_tokens_per_s(table: CostTable, log: dict[ForwardShape, int], tokens: int) -> float | None:
    """`tokens` committed over the predicted time of `log`, rounded; None if the log is empty."""
    seconds = predicted_seconds(table, log)
    return round(tokens / seconds, 2) if seconds > 0 else None


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ascending; tied values share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties: mean ranks), in
    [-1, 1]. None when it is undefined: fewer than 2 pairs, or one side all equal."""
    if len(xs) != len(ys):
        raise ValueError(f"spearman needs pairs: {len(xs)} x values, {len(ys)} y values")
    if len(xs) < 2:
        return None
    rx, ry = ranks(xs), ranks(ys)
    mean = (len(xs) + 1) / 2  # the mean of ranks 1..n, ties or not
    cov = sum((a - mean) * (b - mean) for a, b in zip(rx, ry))
    var_x = sum((a - mean) ** 2 for a in rx)
    var_y = sum((b - mean) ** 2 for b in ry)
    if var_x == 0 or var_y == 0:
        return None
    return cov / (var_x * var_y) ** 0.5
