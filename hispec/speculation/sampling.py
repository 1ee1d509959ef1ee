"""Sampling parameters, the processed distribution they define, and keyed random draws.

The target distribution of a request is the full model's softmax(logits / temperature),
restricted to the top-k tokens and then to the top-p nucleus, renormalized. Every level
processes its own logits the same way, so each level's proposals come from a known
distribution the level above can verify against.

Random draws are not taken from a shared generator: each one is a hash of (seed, level,
position, attempt, purpose). A request's output then depends only on its seed, never on the
batch it ran in or the order in which the scheduler advanced it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# purposes of a draw at one (level, position, attempt)
ACCEPT, SAMPLE = 0, 1

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    seed: int | None = None  # None: a random seed is drawn when the request is admitted

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_seed(self) -> "SamplingParams":
        """These params with a concrete seed (drawn at random when none was given)."""
        if self.seed is not None:
            return self
        return SamplingParams(self.temperature, self.top_k, self.top_p, random.getrandbits(63))


def processed_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """logits [N, V] (row i belongs to params[i], none greedy) -> probabilities [N, V] (fp32)."""
    logits = logits.float()
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=logits.device)
    logits = logits / temperature[:, None]
    top_k = [p.top_k for p in params]
    if any(0 < k < logits.shape[-1] for k in top_k):
        ranked = logits.sort(dim=-1, descending=True).values  # [N, V]
        kth = torch.tensor([k - 1 if 0 < k < logits.shape[-1] else logits.shape[-1] - 1 for k in top_k],
                           device=logits.device)
        threshold = ranked.gather(-1, kth[:, None])  # [N, 1]; ties with the k-th token are kept
        logits = logits.masked_fill(logits < threshold, -math.inf)
    probs = logits.softmax(dim=-1)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=logits.device)
    if bool((top_p < 1).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly more likely tokens
        drop_sorted = before >= top_p[:, None]  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a bijective 64-bit mix."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def keyed_uniform(seed: int, level: int, position: int, attempt: int, purpose: int) -> float:
    """A uniform draw in [0, 1) that is a pure function of its key."""
    h = _mix64(seed)
    for part in (level, position, attempt, purpose):
        h = _mix64(h ^ part)
    return (h >> 11) * 2.0**-53


def sample_from(probs: torch.Tensor, uniform: float) -> int:
    """Inverse-CDF sample of one token from an unnormalized distribution probs [V] (host sync)."""
    cdf = probs.double().cumsum(-1)
    # right=True: the first token whose cdf exceeds the target, so zero-mass tokens are never picked
    token = int(torch.searchsorted(cdf, cdf[-1:] * uniform, right=True))
    return min(token, probs.shape[-1] - 1)
