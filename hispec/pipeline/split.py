"""Where to cut the model into stages.

Stage 0 holds the embeddings and layers [0, e_v), e_v being the deepest exit below the target:
drafting and intermediate verification never leave it. Layers [e_v, L) are split among the other
stages by measured cost: contiguous ranges whose summed per-layer cost is as even as it can be
(the last stage also pays for the final head). Without exits (autoregressive decoding), all L
layers are split that way, stage 0 included.
"""

from __future__ import annotations

from collections.abc import Sequence


def balanced_ranges(costs: Sequence[float], parts: int, offset: int = 0, tail_cost: float = 0.0) -> list[tuple[int, int]]:
    """Cut layers offset .. offset + len(costs) into `parts` contiguous non-empty ranges that
    minimize the most expensive range (`tail_cost` is added to the last one). Exact (dynamic
    programming over cut points; a model has at most a few hundred layers)."""
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} layers into {parts} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(i: int, j: int) -> float:  # layers [i, j) of `costs`
        return prefix[j] - prefix[i] + (tail_cost if j == n else 0.0)

    inf = float("inf")
    # best[p][j]: the cheapest maximum over p ranges covering [0, j); cut[p][j]: where the last starts
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for p in range(1, parts + 1):
        for j in range(p, n + 1):
            for i in range(p - 1, j):
                value = max(best[p - 1][i], cost(i, j))
                if value < best[p][j] - 1e-12:
                    best[p][j], cut[p][j] = value, i
    ranges, j = [], n
    for p in range(parts, 0, -1):
        i = cut[p][j]
        ranges.append((offset + i, offset + j))
        j = i
    return ranges[::-1]


def max_stages(num_layers: int, verifier_exit: int | None) -> int:
    """The most stages `stage_bounds` can cut: one per layer, and with exits, stage 0 holds all of
    [0, e_v) (so at most 1 + L - e_v stages)."""
    return num_layers - verifier_exit + 1 if verifier_exit else num_layers


def stage_bounds(num_layers: int, num_stages: int, verifier_exit: int | None,
                 layer_costs: Sequence[float] | None = None, head_cost: float = 0.0) -> tuple[int, ...]:
    """Layer bounds (0, b_1, ..., L) of `num_stages` stages. `verifier_exit`: e_v, the deepest
    exit below the target (None or 0: no exits). `layer_costs`: measured seconds per layer (equal
    if not given); `head_cost`: the final head's, charged to the last stage."""
    if num_stages < 1:
        raise ValueError("num_stages must be >= 1")
    if num_stages > num_layers:
        raise ValueError(f"{num_stages} stages for {num_layers} layers: at most one stage per layer")
    costs = list(layer_costs) if layer_costs is not None else [1.0] * num_layers
    if len(costs) != num_layers:
        raise ValueError(f"{len(costs)} layer costs for {num_layers} layers")
    if num_stages == 1:
        return (0, num_layers)
    if verifier_exit:
        if not 0 < verifier_exit < num_layers:
            raise ValueError(f"exit {verifier_exit} is not inside [1, {num_layers})")
        if num_layers - verifier_exit < num_stages - 1:
            raise ValueError(f"layers [{verifier_exit}, {num_layers}) cannot fill {num_stages - 1} stages")
        deep = balanced_ranges(costs[verifier_exit:], num_stages - 1, verifier_exit, head_cost)
        return (0, *[hi for _, hi in [(0, verifier_exit), *deep]])
    ranges = balanced_ranges(costs, num_stages, 0, head_cost)
    return (0, *[hi for _, hi in ranges])
