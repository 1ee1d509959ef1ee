"""What one engine step asks of the executors, and what they answer: plain data, no tensors in a plan.

The scheduler writes a `StepPlan`; an executor (one process, or a pipeline of stage actors)
runs it and answers one `HeadOutput` per sequence per forward that asked for exit-head rows.
A plan is small (token counts and ids) so it crosses process boundaries cheaply.

    plan = StepPlan(
        truncations=(Truncate(slot=0, layer_hi=6, length=17),),   # last step's rejections
        releases=(3,),                                            # finished sequences' slots
        forwards=(Forward(0, 2, feeds=(Feed(0, 17, 1, 1, (42,)),), output_ring=RingKey(2, 5)), ...),
    )
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch


class RingKey(NamedTuple):
    """A buffer of hidden states at exit `exit` (after layer exit - 1) of not-yet-verified tokens,
    [slots, window + 1, d], indexed by position % window (column `window` takes ragged padding).
    It lives on the stage that owns layer exit - 1."""

    exit: int
    window: int


@dataclass(frozen=True, slots=True)
class Feed:
    """Tokens [start, start + count) of the sequence in `slot`, run through a forward's layers."""

    slot: int
    start: int  # KV length of the forward's layers before it: the first token's position
    count: int
    # Exit-head rows wanted after the forward: the last `head_rows` tokens' (0: none, a catch-up
    # feed that only fills KV and hidden states; 1 for a prefill: the prompt's last token).
    head_rows: int
    token_ids: tuple[int, ...] | None = None  # the tokens themselves, when the forward starts at layer 0
    logits: bool = False  # also return the head's logits rows (sampled sequences), not only the argmax


@dataclass(frozen=True, slots=True)
class Forward:
    """One ragged forward of layers [lo, hi) over `feeds`, possibly spanning several stages."""

    lo: int
    hi: int
    feeds: tuple[Feed, ...]
    input_ring: RingKey | None = None  # hidden states at layer lo come from here; None: token ids (lo == 0)
    output_ring: RingKey | None = None  # hidden states after layer hi - 1 are kept here for the level above
    head_vocab: int | None = None  # score tokens [0, head_vocab) only (greedy proposals); None: all
    prefill: bool = False

    @property
    def width(self) -> int:
        """T: tokens per sequence, padded to the widest feed."""
        return max(f.count for f in self.feeds)

    @property
    def head_row_count(self) -> int:
        return sum(f.head_rows for f in self.feeds)


@dataclass(frozen=True, slots=True)
class Truncate:
    """Roll the KV of layers [0, layer_hi) of `slot` back to `length` tokens (a rejection)."""

    slot: int
    layer_hi: int
    length: int


@dataclass(frozen=True, slots=True)
class SpeculateAhead:
    """Greedy speculation below the target for the sequence in `slot`, run where it is cheap: by the
    first stage, on its own, after the step's forwards (hispec.engine.ahead). In a pipeline it runs
    while the deeper stages check the window this step sent them, so drafting leaves the critical
    path, and it costs no driver round trip per draft.

    Levels 0..K-1 of the hierarchy with `bounds` (0, e_0, ..., e_{K-1}, L) and `budgets` draft and
    verify (greedy: argmax) until level K-1's chain reaches `goal` tokens or closes (a stop token,
    or `limit`); K is 1 or 2. Start: the chain holds `base` tokens, the last of which this step ran
    through level 0 (its row at exit e_0 is in that ring: the exit head there proposes the token at
    `base`); `fed` is each level's KV length after the step's forwards. With `verifier_row`, the step
    also ran that token through level K-1 (the catch-up that fed the target): level K-1's first
    check starts with the exit head on its row there. Both heads run here, after the rows for the
    deeper stages left, not before."""

    slot: int
    bounds: tuple[int, ...]
    budgets: tuple[int, ...]
    window: int  # the hierarchy's ring window
    base: int
    fed: tuple[int, ...]  # per level 0..K-1
    goal: int  # stop once level K-1 holds this many tokens
    limit: int  # most tokens (prompt + new) the sequence may hold
    stop_token_ids: frozenset[int] = frozenset()
    head_vocab: int | None = None  # as Forward.head_vocab
    verifier_row: bool = False


@dataclass(frozen=True, slots=True)
class AheadOutput:
    """What a `SpeculateAhead` produced: level K-1's chain from `base` on (every level below the
    target now holds it; its last token is not run through any layer yet), the KV length of each
    level, and what it ran, for statistics."""

    tokens: tuple[int, ...]
    fed: tuple[int, ...]  # per level 0..K-1
    proposed: tuple[int, ...]  # per level 0..K-1 (level 0: tokens drafted)
    accepted: tuple[int, ...]  # per level 0..K-1 (level 0: always 0)
    rounds: tuple[int, ...]
    forwards: tuple[tuple[int, int, int], ...]  # (layers, tokens, head rows) of every forward it ran (0 layers: a head alone)


@dataclass(frozen=True, slots=True)
class StepPlan:
    """Applied in this order: truncations, releases, the forwards in sequence (a forward may
    read a ring an earlier forward of the same step wrote), then the speculations ahead."""

    truncations: tuple[Truncate, ...] = ()
    releases: tuple[int, ...] = ()
    forwards: tuple[Forward, ...] = ()
    aheads: tuple[SpeculateAhead, ...] = ()

    @property
    def empty(self) -> bool:
        """Nothing for any executor to do."""
        return not (self.forwards or self.truncations or self.releases or self.aheads)


@dataclass(frozen=True, slots=True)
class HeadOutput:
    """The exit head's answer for one feed: per head row (in token order), the argmax token
    and, when the feed asked for them, the logits rows [head_rows, V] (on the CPU)."""

    argmax: list[int]
    logits: torch.Tensor | None = None


# Per forward of a plan: slot -> its head output (only feeds with head_rows > 0); then per
# speculation ahead: {slot: AheadOutput}.
StepResult = list[dict[int, HeadOutput | AheadOutput]]


@dataclass(frozen=True, slots=True)
class KVSnapshot:
    """What a stage holds, for consistency checks: per slot, per owned layer, the KV length;
    with tensors, the valid keys/values [n_kv_heads, length, head_dim] and ring rows."""

    layer_range: tuple[int, int]
    lengths: dict[int, list[int]]  # slot -> [length of layer lo, ..., layer hi - 1]
    keys: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    values: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    rings: dict[RingKey, torch.Tensor] = field(default_factory=dict)  # whole ring buffers
