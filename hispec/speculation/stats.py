"""Speculation statistics, per request and aggregated."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from hispec.speculation.hierarchy import Hierarchy


@dataclass
class LevelStats:
    proposed: int = 0  # level 0: tokens drafted; level k >= 1: proposals it checked
    accepted: int = 0  # level k >= 1: proposals it accepted
    rounds: int = 0  # level 0: draft steps; level k >= 1: verification passes

    def add(self, other: "LevelStats") -> None:
        self.proposed += other.proposed
        self.accepted += other.accepted
        self.rounds += other.rounds


@dataclass
class RequestStats:
    levels: list[LevelStats]  # index = level, 0 (draft) .. K (target)
    new_tokens: int = 0
    target_passes: int = 0  # full-depth forwards (the prefill counts as one)
    layer_forwards: int = 0  # layers run in forwards this sequence took part in (weight passes)
    layer_token_passes: int = 0  # tokens x layers run while decoding (compute; prefill counts its last token)
    requests: int = 1

    @classmethod
    def empty(cls, hierarchy: Hierarchy) -> "RequestStats":
        return cls(levels=[LevelStats() for _ in range(hierarchy.depth + 1)])

    @classmethod
    def total(cls, hierarchy: Hierarchy, stats: Iterable["RequestStats"]) -> "RequestStats":
        out = cls.empty(hierarchy)
        out.requests = 0
        for s in stats:
            for mine, theirs in zip(out.levels, s.levels):
                mine.add(theirs)
            out.new_tokens += s.new_tokens
            out.target_passes += s.target_passes
            out.layer_forwards += s.layer_forwards
            out.layer_token_passes += s.layer_token_passes
            out.requests += s.requests
        return out

    def to_dict(self, hierarchy: Hierarchy) -> dict:
        per_token = max(self.new_tokens, 1)
        levels = []
        for k, level in enumerate(self.levels):
            lo, hi = hierarchy.layer_range(k)
            entry = {"level": k, "exit": hi, "role": "draft" if k == 0 and hierarchy.depth else
                     "target" if k == hierarchy.depth else "verifier", "rounds": level.rounds}
            if k == 0:
                entry["drafted"] = level.proposed
            else:
                entry |= {"proposed": level.proposed, "accepted": level.accepted,
                          "acceptance_rate": round(level.accepted / level.proposed, 4) if level.proposed else None}
            levels.append(entry)
        return {
            "hierarchy": hierarchy.describe(),
            "requests": self.requests,
            "new_tokens": self.new_tokens,
            "target_passes": self.target_passes,
            "tokens_per_target_pass": round(self.new_tokens / max(self.target_passes, 1), 4),
            "layer_forwards_per_token": round(self.layer_forwards / per_token, 4),
            "layer_token_passes_per_token": round(self.layer_token_passes / per_token, 4),
            "levels": levels,
        }
