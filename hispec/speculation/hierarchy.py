"""The speculation hierarchy: exit layers e_0 < e_1 < ... < e_K = L and a token budget per level.

Level k runs layers [e_{k-1}, e_k) (with e_{-1} = 0) and reads the exit head after layer e_k:
  - level 0 drafts: it proposes one token per step, `budgets[0]` per round;
  - level k in 1..K-1 verifies the tokens level k-1 holds; when it has `budgets[k]` tokens
    beyond level k+1's, level k+1 checks them;
  - level K (the full model) is the target; only it commits output.
K = 0 is autoregressive decoding, K = 1 single-exit self-speculation (LayerSkip), K = 2 HiSpec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

METHODS = ("ar", "layerskip", "hispec")
TUNED_CONFIG_NAME = "hispec_config.json"  # written by `hispec tune` next to the checkpoint


@dataclass(frozen=True)
class Hierarchy:
    num_layers: int  # L: the target's depth
    exits: tuple[int, ...] = ()  # e_0 < ... < e_{K-1} < L, counted from 1 (exit e = after layer e)
    budgets: tuple[int, ...] = ()  # one per exit: budgets[k] tokens of level k trigger level k+1
    # Derived once (the engine reads them every forward): layer bounds (0, e_0, ..., L) and `window`.
    bounds: tuple[int, ...] = field(init=False, repr=False, compare=False)
    window: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "exits", tuple(int(e) for e in self.exits))
        object.__setattr__(self, "budgets", tuple(int(n) for n in self.budgets))
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if len(self.budgets) != len(self.exits):
            raise ValueError(f"one budget per exit: exits {self.exits}, budgets {self.budgets}")
        bounds = (0, *self.exits, self.num_layers)
        if any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"exits must be increasing and within [1, {self.num_layers - 1}], got {self.exits}")
        if any(n < 1 for n in self.budgets):
            raise ValueError(f"budgets must be >= 1, got {self.budgets}")
        object.__setattr__(self, "bounds", bounds)
        # An upper bound on the positions a level holds beyond the level above, plus slack: the
        # size of the per-level ring buffers of hidden states and probability rows.
        object.__setattr__(self, "window", sum(self.budgets) + 2)

    @property
    def depth(self) -> int:
        """K: the number of speculative levels below the target."""
        return len(self.exits)

    @property
    def method(self) -> str:
        return METHODS[min(self.depth, 2)]

    def layer_range(self, level: int) -> tuple[int, int]:
        """Layers [lo, hi) that level `level` runs."""
        return self.bounds[level], self.bounds[level + 1]

    def describe(self) -> str:
        if not self.exits:
            return f"ar (L={self.num_layers})"
        return f"{self.method} exits={','.join(map(str, self.exits))} budgets={','.join(map(str, self.budgets))} (L={self.num_layers})"

    def to_dict(self) -> dict:
        return {"exits": list(self.exits), "budgets": list(self.budgets)}


def paper_default(method: str, num_layers: int) -> Hierarchy:
    """The untuned defaults: HiSpec at 1/8 and 1/4 depth with budgets 2 and 4 (as in the
    paper); LayerSkip drafting from 1/4 depth, 4 tokens per round."""
    eighth, quarter = max(1, num_layers // 8), max(2, num_layers // 4)
    if method == "ar" or num_layers < 3:
        return Hierarchy(num_layers)
    if method == "layerskip":
        return Hierarchy(num_layers, (min(quarter, num_layers - 1),), (4,))
    if method == "hispec":
        return Hierarchy(num_layers, (eighth, min(quarter, num_layers - 1)), (2, 4))
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def load_tuned(model_dir: Path, num_layers: int) -> dict[str, Hierarchy]:
    """Hierarchies stored by `hispec tune` next to a checkpoint ({} when there is none)."""
    path = Path(model_dir) / TUNED_CONFIG_NAME
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {
        method: Hierarchy(num_layers, tuple(entry["exits"]), tuple(entry["budgets"]))
        for method, entry in data.get("methods", {}).items()
        if method in METHODS
    }


def resolve_hierarchy(
    method: str,
    num_layers: int,
    model_dir: Path | None = None,
    exits: tuple[int, ...] | None = None,
    budgets: tuple[int, ...] | None = None,
) -> Hierarchy:
    """What a user asked for: explicit exits/budgets, else the tuned hierarchy stored with the
    checkpoint, else the paper's defaults. Checks that the shape matches the method."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if method == "ar":
        if exits:
            raise ValueError("--method ar takes no exits")
        return Hierarchy(num_layers)
    base = (load_tuned(model_dir, num_layers) if model_dir else {}).get(method) or paper_default(method, num_layers)
    exits = tuple(exits) if exits else base.exits
    if (method == "layerskip" and len(exits) != 1) or (method == "hispec" and len(exits) < 2):
        wanted = {"layerskip": "exactly one exit", "hispec": "two or more exits"}[method]
        raise ValueError(f"--method {method} needs {wanted}, got exits {exits}")
    if budgets:
        budgets = tuple(budgets)
    elif len(exits) == len(base.budgets):
        budgets = base.budgets
    else:
        raise ValueError(f"give one budget per exit (--budgets) for exits {exits}")
    return Hierarchy(num_layers, exits, budgets)


@dataclass(frozen=True)
class BatchPolicy:
    """Which hierarchy a request gets, by the batch size when it is admitted (from tuning: under
    load, speculation can cost more than it saves). `rules` are (max batch size, hierarchy) in
    ascending order; the last rule's bound is None (any size)."""

    rules: tuple[tuple[int | None, Hierarchy], ...]

    def __post_init__(self) -> None:
        bounds = [b for b, _ in self.rules]
        if not self.rules or bounds[-1] is not None or any(b is None or b < 1 for b in bounds[:-1]) \
                or bounds[:-1] != sorted(set(bounds[:-1])):
            raise ValueError(f"policy bounds must be ascending positive sizes ending with None, got {bounds}")
        if len({h.num_layers for _, h in self.rules}) != 1:
            raise ValueError("every hierarchy of a policy must be for the same model depth")

    @classmethod
    def fixed(cls, hierarchy: Hierarchy) -> "BatchPolicy":
        return cls(((None, hierarchy),))

    def choose(self, batch_size: int) -> Hierarchy:
        return next(h for bound, h in self.rules if bound is None or batch_size <= bound)

    @property
    def hierarchies(self) -> list[Hierarchy]:
        return list(dict.fromkeys(h for _, h in self.rules))

    def describe(self) -> str:
        return "; ".join(f"{'any' if b is None else f'<= {b}'}: {h.describe()}" for b, h in self.rules)


def load_policy(model_dir: Path, num_layers: int) -> BatchPolicy | None:
    """The batch-size policy stored by `hispec tune` ({"by_batch_size": [{"max_batch_size", "method"}]})."""
    path = Path(model_dir) / TUNED_CONFIG_NAME
    if not path.is_file():
        return None
    rules = json.loads(path.read_text()).get("by_batch_size")
    if not rules:
        return None
    tuned = load_tuned(model_dir, num_layers)
    return BatchPolicy(tuple(
        (rule["max_batch_size"], Hierarchy(num_layers) if rule["method"] == "ar" else tuned[rule["method"]])
        for rule in rules))


def resolve_policy(
    method: str,
    num_layers: int,
    model_dir: Path | None,
    exits: tuple[int, ...] | None = None,
    budgets: tuple[int, ...] | None = None,
) -> BatchPolicy:
    """`method` "auto": the tuned batch-size policy (else the tuned/paper HiSpec hierarchy at any
    size); any other method: that one hierarchy at every batch size (see `resolve_hierarchy`)."""
    if method != "auto":
        return BatchPolicy.fixed(resolve_hierarchy(method, num_layers, model_dir, exits, budgets))
    if exits or budgets:
        raise ValueError("method auto takes its hierarchies from the tuning data, not exits/budgets")
    return (load_policy(model_dir, num_layers) if model_dir else None) or BatchPolicy.fixed(
        resolve_hierarchy("hispec", num_layers, model_dir))
