"""Per-sequence speculation state and the policy that picks its next action.

One token list serves every level: `tokens[:accepted[k]]` is level k's chain. Chains are nested
(accepted[0] >= ... >= accepted[K]); level K's chain is the committed output. `fed[k]` is how
many chain tokens went through level k's layers, i.e. the KV length of those layers.

Invariant between steps, for every level k: fed[k] == accepted[k] - 1, or the level's chain
ends where it cannot continue and nothing below it waits (the last accepted token of a level
is not yet run through it: it is the input of that level's next step).
"""

from __future__ import annotations

from dataclasses import dataclass

from hispec.spec.hierarchy import Hierarchy
from hispec.spec.request import Request
from hispec.spec.sampling import SamplingParams
from hispec.spec.stats import RequestStats


@dataclass
class SequenceState:
    request: Request
    hierarchy: Hierarchy  # chosen at admission; the sequence keeps it
    sampling: SamplingParams  # with a concrete seed
    slot: int
    stop_token_ids: frozenset[int]
    limit: int  # most tokens (prompt + new) this sequence may hold
    tokens: list[int]
    accepted: list[int]  # per level
    fed: list[int]  # per level
    attempts: list[int]  # actions taken per level; part of every random draw's key
    stats: RequestStats
    finish_reason: str | None = None
    stop_string: str | None = None
    committed_before_step: int = 0  # where this step's commit starts

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def committed(self) -> int:
        return self.accepted[-1]

    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len : self.committed]

    def closed(self, level: int) -> bool:
        """Level `level`'s chain cannot grow: it ends with a stop token or reached the limit."""
        end = self.accepted[level]
        return end >= self.limit or self.tokens[end - 1] in self.stop_token_ids

    def next_action(self) -> int:
        """0: draft a token (for K = 0: decode one); k >= 1: verify level k-1's extra tokens at level k.

        The deepest level with enough proposals goes first: its verdict may discard them all."""
        hierarchy = self.hierarchy
        for k in range(hierarchy.depth, 0, -1):
            waiting = self.accepted[k - 1] - self.accepted[k]
            if waiting >= hierarchy.budgets[k - 1] or (waiting > 0 and self.closed(k - 1)):
                return k
        return 0
