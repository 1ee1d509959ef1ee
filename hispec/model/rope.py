"""Rotary position embeddings (Llama convention: rotate the two halves of each head).

cos/sin are computed per forward step for the positions in that step (not from a table sized
by `max_position_embeddings`, which is 128k for Llama 3), once, and shared by every layer.
"""

from __future__ import annotations

import math

import torch

from hispec.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """[head_dim // 2] fp32 inverse frequencies, with `linear` or `llama3` scaling applied."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scale(inv_freq, rope)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
    # them interpolated smoothly.
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotary_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin for `positions` [B, T] -> each [B, T, 1, head_dim].

    The sin half that multiplies the first half of a head is negated here, so that applying
    the rotation is `x * cos + roll(x, D/2) * sin`: 4 ops per step instead of 6.
    """
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = freqs.cos()
    sin = freqs.sin()
    cos = torch.cat((cos, cos), dim=-1)
    sin = torch.cat((-sin, sin), dim=-1)
    return cos.to(dtype)[:, :, None, :], sin.to(dtype)[:, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos/sin: [B, T, 1, D] from `rotary_cos_sin`."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


class RotaryTable:
    """cos/sin rows for positions [0, n) in the model's dtype and device, grown on demand.

    A decode step then costs two row gathers instead of recomputing the trigonometry.
    """

    def __init__(self, inv_freq: torch.Tensor, dtype: torch.dtype) -> None:
        self.inv_freq = inv_freq
        self.dtype = dtype
        self.cos = self.sin = torch.empty(1, 0, 1, 0)  # [1, positions, 1, head_dim]

    def lookup(self, positions: torch.Tensor, max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (CPU int64) -> cos, sin [B, T, 1, head_dim] on the table's device."""
        self._grow((int(positions.max()) if max_position is None else max_position) + 1)
        index = positions.to(self.cos.device)
        return self.cos[0, index], self.sin[0, index]

    def rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, end - start, 1, head_dim] of positions start..end-1: views, no gather."""
        self._grow(end)
        return self.cos[:, start:end], self.sin[:, start:end]

    def _grow(self, needed: int) -> None:
        if needed > self.cos.shape[1]:
            size = max(needed, 2 * self.cos.shape[1], 256)
            rows = torch.arange(size, device=self.inv_freq.device)[None, :]
            self.cos, self.sin = rotary_cos_sin(rows, self.inv_freq, self.dtype)  # [1, size, 1, D]
