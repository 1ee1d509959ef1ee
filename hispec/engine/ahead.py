"""Speculation ahead: the levels below the target, run greedily by the stage that holds them.

The driver's scheduler decides every draft and verification with one round trip each. For a
greedy sequence none of those decisions needs the driver: a draft is the exit head's argmax and a
verification compares argmaxes. So the first stage runs them itself (`SpeculateAhead` in the plan,
after the step's forwards), and the driver sees one result per window: the chain that level K-1
accepted. In a pipeline this runs while the deeper stages check the window sent to them in the
same step (the overlap); only the target's verdict commits anything, so the output is plain
greedy decoding whatever happens here.

The rules are the scheduler's (hispec.speculation.state / hispec.engine.scheduler), for one
sequence: the deepest level with `budgets[k-1]` proposals waiting verifies them, otherwise level 0
drafts; a verification with a bonus row first runs the chain's last token through the levels below
it (the catch-up); a verdict cuts the chain after the accepted prefix, appends the correction or
bonus token and rolls the KV of every level up to the verifier back to the new chain minus its
last token.

    out = speculate_ahead(stage, op, first_draft)   # AheadOutput: tokens, KV lengths, statistics
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hispec.engine.plan import AheadOutput, Feed, Forward, RingKey, SpeculateAhead
from hispec.speculation.rejection import verify_greedy
from hispec.speculation.state import next_action


@dataclass
class _Chain:
    """One sequence's chains below the target, in absolute positions; tokens before `base` are not
    needed here (the KV holds them)."""

    op: SpeculateAhead
    tokens: list[int]  # positions base, base + 1, ...
    accepted: list[int]  # per level 0..K-1
    fed: list[int]
    proposed: list[int] = field(default_factory=list)
    verified: list[int] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    forwards: list[tuple[int, int, int]] = field(default_factory=list)
    carried: list[int] = field(default_factory=list)  # level K-1's argmax rows from `base` computed before

    def token(self, position: int) -> int:
        return self.tokens[position - self.op.base]

    def closed(self, level: int) -> bool:
        end = self.accepted[level]
        return end >= self.op.limit or (end > self.op.base and self.token(end - 1) in self.op.stop_token_ids)

    def next_action(self) -> int:
        """The scheduler's rule over levels 0..K-1 (K-1 plays the target's part)."""
        return next_action(self.accepted, self.op.budgets, self.closed)

    def done(self) -> bool:
        return self.accepted[-1] >= self.op.goal or self.closed(len(self.accepted) - 1)


def speculate_ahead(stage, op: SpeculateAhead) -> AheadOutput:
    """Run `op` on `stage` (which holds layers [0, e_{K-1}) and their exit heads)."""
    K = len(op.bounds) - 2  # levels 0..K-1 run here
    if K not in (1, 2):
        raise ValueError(f"speculation ahead runs hierarchies of 1 or 2 levels below the target, not {K}")
    chain = _Chain(op, [], [op.base] * K, list(op.fed), [1] + [0] * (K - 1), [0] * K, [1] + [0] * (K - 1))
    chain.tokens.append(_head(stage, chain, op.bounds[1], op.base - 1))  # the first draft
    chain.accepted[0] += 1
    if op.verifier_row:
        chain.carried = [_head(stage, chain, op.bounds[K], op.base - 1)]
    while not chain.done():
        k = chain.next_action()
        if k == 0:
            if chain.closed(0):
                break
            _draft(stage, chain)
        else:
            _verify(stage, chain, k)
    return AheadOutput(tuple(chain.tokens[: chain.accepted[-1] - op.base]), tuple(chain.fed), tuple(chain.proposed),
                       tuple(chain.verified), tuple(chain.rounds), tuple(chain.forwards))


def _head(stage, chain: _Chain, exit_layer: int, position: int) -> int:
    """The exit head's argmax on the row the ring at `exit_layer` holds for `position`."""
    op = chain.op
    chain.forwards.append((0, 1, 1))
    return stage.ring_head(RingKey(exit_layer, op.window), op.slot, position, op.head_vocab)


def _run(stage, chain: _Chain, first: int, last: int, start: int, count: int, head_rows: int) -> list[int]:
    """Positions [start, start + count) through levels first..last (one forward); the head's argmax rows."""
    op = chain.op
    lo, hi = op.bounds[first], op.bounds[last + 1]
    token_ids = tuple(chain.tokens[start - op.base : start - op.base + count]) if first == 0 else None
    forward = Forward(lo, hi, (Feed(op.slot, start, count, head_rows, token_ids),),
                      input_ring=RingKey(lo, op.window) if first > 0 else None,
                      output_ring=RingKey(hi, op.window), head_vocab=op.head_vocab)
    _, heads = stage.run(forward, None)
    for level in range(first, last + 1):
        chain.fed[level] += count
    chain.forwards.append((hi - lo, count, head_rows))
    return heads[op.slot].argmax if head_rows else []


def _draft(stage, chain: _Chain) -> None:
    """Level 0 proposes the token after its chain (its last token goes through layers [0, e_0))."""
    end = chain.accepted[0]
    chain.tokens.append(_run(stage, chain, 0, 0, end - 1, 1, 1)[0])
    chain.accepted[0] += 1
    chain.proposed[0] += 1
    chain.rounds[0] += 1


def _verify(stage, chain: _Chain, k: int) -> None:
    """Level k checks what level k-1 holds beyond it; every level up to k continues from the verdict."""
    op = chain.op
    bonus = not chain.closed(k - 1)
    end = chain.accepted[k - 1] if bonus else chain.accepted[k - 1] - 1
    if bonus:  # the last proposal was never run below level k: one forward over levels 0..k-1
        _run(stage, chain, 0, k - 1, end - 1, 1, 0)
    start = chain.accepted[k]
    count = end - chain.fed[k]
    argmax = chain.carried + _run(stage, chain, k, k, chain.fed[k], count, count) if count else chain.carried
    chain.carried = []
    proposals = [chain.token(p) for p in range(start, chain.accepted[k - 1])]
    verdict = verify_greedy(proposals, argmax)
    chain.proposed[k] += len(proposals)
    chain.verified[k] += verdict.accepted
    chain.rounds[k] += 1
    kept = start + verdict.accepted
    del chain.tokens[kept - op.base :]
    if verdict.next_token is not None:
        chain.tokens.append(verdict.next_token)
    new_len = op.base + len(chain.tokens)
    for j in range(k + 1):
        chain.accepted[j] = new_len
        chain.fed[j] = new_len - 1
    stage.cache.rollback((stage.lo, min(op.bounds[k + 1], stage.hi)), [op.slot], [new_len - 1])
