"""Decisions from exit-head outputs: a draft's proposal, a verifier's verdict, a prefill's first token.

Greedy sequences decide from the argmax of each head row (host ints, no tensors). Sampled ones
use processed probability rows: level k's rows at the positions it keeps are the distribution
level k+1 verifies them against (its q), so they are kept here, per hierarchy, in rings
[slots, window, V] indexed by position % window (allocated on the first sampled request).

Random draws are keyed by (seed, level, position, attempt, purpose), never shared, so an output
depends on its seed only, whatever the batch or the timing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hispec.speculation.hierarchy import Hierarchy
from hispec.speculation.rejection import RejectionSampler, Verdict, verify_greedy
from hispec.speculation.sampling import SAMPLE, keyed_uniform, processed_probs, sample_from
from hispec.speculation.state import SequenceState


class Decider:
    def __init__(self, num_slots: int, vocab_size: int, verifier: RejectionSampler | None = None) -> None:
        self.num_slots, self.vocab_size = num_slots, vocab_size
        self.verifier = verifier or RejectionSampler()
        self._prob_rings: dict[Hierarchy, list[torch.Tensor]] = {}

    def decide(self, seq: SequenceState, level: int, prefill: bool, argmax: Sequence[int],
               logits: torch.Tensor | None) -> Verdict:
        """The verdict of one decision: `argmax` [rows] and `logits` [rows, V] (sampled only) are
        the head's rows for it, in token order."""
        if prefill:
            return self.first_token(seq, argmax, logits)
        if level == 0:
            return self.draft(seq, argmax, logits)
        return self.verify(seq, level, argmax, logits)

    def first_token(self, seq: SequenceState, argmax: Sequence[int], logits: torch.Tensor | None) -> Verdict:
        """The token after the prompt, from the target's row at the prompt's last position."""
        K, P = seq.hierarchy.depth, seq.prompt_len
        if seq.sampling.greedy:
            return Verdict(0, argmax[0])
        p = processed_probs(logits[:1], [seq.sampling])[0]
        return Verdict(0, sample_from(p, keyed_uniform(seq.sampling.seed, K, P, seq.attempts[K], SAMPLE)))

    def draft(self, seq: SequenceState, argmax: Sequence[int], logits: torch.Tensor | None) -> Verdict:
        """Level 0 proposes the token after its chain (for K = 0 this is the output)."""
        if seq.sampling.greedy:
            return Verdict(0, argmax[0])
        position, h = seq.accepted[0], seq.hierarchy
        q = processed_probs(logits[:1], [seq.sampling])[0]
        token = sample_from(q, keyed_uniform(seq.sampling.seed, 0, position, seq.attempts[0], SAMPLE))
        if h.depth:
            self._rings(h, q.device)[0][seq.slot, position % h.window] = q
        return Verdict(0, token)

    def verify(self, seq: SequenceState, k: int, argmax: Sequence[int], logits: torch.Tensor | None) -> Verdict:
        """Level k checks the tokens level k-1 holds beyond its own chain. The head rows are level
        k's distributions at positions start, start + 1, ... (one more than the proposals when a
        bonus token is possible)."""
        h, start = seq.hierarchy, seq.accepted[k]
        proposals = seq.tokens[start : seq.accepted[k - 1]]
        if seq.sampling.greedy:
            return verify_greedy(proposals, argmax)
        W = h.window
        p = processed_probs(logits, [seq.sampling] * logits.shape[0])  # [rows, V]
        rings = self._rings(h, p.device)
        q = rings[k - 1][seq.slot, [(start + i) % W for i in range(len(proposals))]]  # [n, V]
        seed, attempt = seq.sampling.seed, seq.attempts[k]
        verdict = self.verifier.verify(proposals, p, q, lambda i, purpose: keyed_uniform(seed, k, start + i, attempt, purpose))
        if k < h.depth:  # this level's rows at the positions it keeps are the next level's q
            kept = verdict.accepted + (verdict.next_token is not None)
            rings[k][seq.slot, [(start + i) % W for i in range(kept)]] = p[:kept]
        return verdict

    def _rings(self, hierarchy: Hierarchy, device: torch.device) -> list[torch.Tensor]:
        rings = self._prob_rings.get(hierarchy)
        if rings is None:
            shape = (self.num_slots, hierarchy.window, self.vocab_size)
            rings = self._prob_rings[hierarchy] = [torch.zeros(shape, device=device) for _ in range(hierarchy.depth)]
        return rings
