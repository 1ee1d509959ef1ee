"""Verification of a level's proposals: speculative (rejection) sampling, and its greedy limit.

Terms (as in vLLM's rejection sampler):
  - proposals: tokens x_0..x_{n-1} the level below put in its chain, each drawn from q_i;
  - accepted: the longest prefix passing the test u_i < p_i(x_i) / q_i(x_i);
  - recovered: at the first rejection, a token drawn from the residual max(0, p_i - q_i);
  - bonus: when all n pass and the level has the next row p_n, a token drawn from p_n.
Each emitted token is distributed exactly as p (Leviathan et al., 2023), so the stream a level
accepts is a valid proposal stream from p for the level above.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hispec.speculation.sampling import ACCEPT, SAMPLE, sample_from


@dataclass(frozen=True)
class Verdict:
    accepted: int  # proposals accepted, a prefix of them
    next_token: int | None  # the recovered or bonus token; None when all passed and no bonus row


class RejectionSampler:
    """The verification rule. Subclass to change it (the tests break it on purpose)."""

    def accept_probability(self, p_x: torch.Tensor, q_x: torch.Tensor) -> torch.Tensor:
        return (p_x / q_x).clamp(max=1.0)

    def residual(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        residual = (p - q).clamp(min=0.0)
        # p == q up to rounding: a rejection was a rounding accident; p itself is then exact
        return residual if float(residual.sum()) > 1e-12 else p

    def verify(
        self,
        proposals: Sequence[int],
        p_rows: torch.Tensor,
        q_rows: torch.Tensor,
        draw: Callable[[int, int], float],
    ) -> Verdict:
        """proposals [n]; p_rows [n or n+1, V] this level's probabilities at each proposal's
        position (plus the bonus position); q_rows [n, V] the distributions the proposals were
        drawn from; draw(i, purpose) the keyed uniform for proposal / position i."""
        n = len(proposals)
        if n:
            index = torch.arange(n)
            tokens = torch.tensor(list(proposals))
            ratios = self.accept_probability(p_rows[index, tokens], q_rows[index, tokens]).tolist()  # host sync
            for i, ratio in enumerate(ratios):
                if not draw(i, ACCEPT) < ratio:
                    return Verdict(i, sample_from(self.residual(p_rows[i], q_rows[i]), draw(i, SAMPLE)))
        if p_rows.shape[0] > n:
            return Verdict(n, sample_from(p_rows[n], draw(n, SAMPLE)))
        return Verdict(n, None)


def verify_greedy(proposals: Sequence[int], target_tokens: Sequence[int]) -> Verdict:
    """The temperature-0 limit: accept while the proposal is this level's argmax; the first
    mismatch is replaced by the argmax. target_tokens [n or n+1] are the argmax per position."""
    for i, token in enumerate(proposals):
        if token != target_tokens[i]:
            return Verdict(i, target_tokens[i])
    n = len(proposals)
    return Verdict(n, target_tokens[n] if len(target_tokens) > n else None)
