"""Per-sequence speculation state and the policy that picks its next action.

One token list serves every level: `tokens[:accepted[k]]` is level k's chain. Chains are nested
(accepted[0] >= ... >= accepted[K]); level K's chain is the committed output. `fed[k]` is how
many chain tokens went through level k's layers, i.e. the KV length of those layers.

Invariant between steps, for every level k: fed[k] == accepted[k] - 1, or the level's chain
ends where it cannot continue and nothing below it waits (the last accepted token of a level
is not yet run through it: it is the input of that level's next step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hispec.speculation.hierarchy import Hierarchy
from hispec.speculation.request import Request
from hispec.speculation.sampling import SamplingParams
from hispec.speculation.stats import RequestStats
from hispec.speculation.stops import StopFinder


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
    stop_finder: StopFinder | None = None  # with the request's stop strings: its search over the committed text

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def committed(self) -> int:
        return self.accepted[-1]

    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len : self.committed]

    def find_stop_string(self) -> tuple[int, str] | None:
        """(new tokens to keep, stop string) once the committed tokens' text shows a stop string,
        else None. Reads only the tokens committed since the last call."""
        if self.stop_finder is None:
            return None
        start = self.prompt_len + self.stop_finder.count
        return self.stop_finder.push(self.tokens[start : self.committed])

    def closed(self, level: int) -> bool:
        """Level `level`'s chain cannot grow: it ends with a stop token or reached the limit."""
        end = self.accepted[level]
        return end >= self.limit or self.tokens[end - 1] in self.stop_token_ids

    def next_action(self) -> int:
        """0: draft a token (for K = 0: decode one); k >= 1: verify level k-1's extra tokens at level k."""
        return next_action(self.accepted, self.hierarchy.budgets, self.closed)


def next_action(accepted: Sequence[int], budgets: Sequence[int], closed: Callable[[int], bool]) -> int:
    """The action of a sequence whose levels 0..len(accepted)-1 hold chains of `accepted` tokens:
    0 drafts; k >= 1 verifies at level k what level k-1 holds beyond it, once that is `budgets[k-1]`
    tokens or level k-1's chain is `closed` (cannot grow). The deepest level with enough proposals
    goes first: its verdict may discard them all. (The scheduler's rule, and speculation ahead's.)"""
    for k in range(len(accepted) - 1, 0, -1):
        waiting = accepted[k - 1] - accepted[k]
        if waiting >= budgets[k - 1] or (waiting > 0 and closed(k - 1)):
            return k
    return 0


def align_actions(members: list[SequenceState], actions: dict[int, int]) -> None:
    """Pull verifications into step across the batch (in place; `actions` is by slot).

    A step costs about as much as the deepest level it runs. Left alone, sequences that joined at
    different times verify in different steps, so nearly every step runs the full model for some
    of them and the cheap draft-only steps disappear. Here a sequence that would draft, or verify
    at a shallower level, verifies at the deepest level k someone verifies at this step, if it has
    proposals waiting there and nothing pending below them (the levels under k-1 hold no more than
    level k-1: the state in which its own rule would verify at k). Verifying fewer proposals than
    the budget is what a closed chain does anyway, so the output is unchanged and the batch falls
    into one rhythm.

    Greedy sequences only: a sampled sequence's draws are keyed by where it verifies, so it keeps
    its own rhythm and a seed reproduces the same text whatever batch it runs in.
    """
    levels = sorted({k for k in actions.values() if k > 0}, reverse=True)
    if not levels:
        return
    for seq in members:
        if not seq.sampling.greedy:
            continue
        for k in levels:
            if k <= actions[seq.slot]:
                break
            if seq.accepted[k - 1] > seq.accepted[k] and all(seq.accepted[j] == seq.accepted[k - 1] for j in range(k - 1)):
                actions[seq.slot] = k
                break
