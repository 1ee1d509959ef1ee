"""`ForwardStep`: what every layer of one batched forward shares, computed once per step.

A step advances a batch of sequences (cache slots) by up to T tokens each; sequence b brings
`num_tokens[b]` real tokens, the rest of its row is padding (a ragged batch). Positions,
cache write indices, the attention mask and the rotary cos/sin are built here once, so the
per-layer code only indexes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hispec.kv.cache import KVCache
from hispec.model.rope import RotaryTable


@dataclass(frozen=True)
class ForwardStep:
    slots: tuple[int, ...]
    starts: np.ndarray  # [B] int64, host: valid cache length before the step
    num_tokens: np.ndarray  # [B] int64, host: real tokens per sequence (<= T)
    ends: np.ndarray  # [B] int64, host: starts + num_tokens, the cache lengths after the step
    slot_index: torch.Tensor  # [B, 1] device: cache row of each sequence, for writes
    slot_read: slice | torch.Tensor  # contiguous slots read as a view, others gathered
    write_pos: torch.Tensor  # [B, T] device: cache column per token (padding -> scratch)
    # The cache columns written when the step is one rectangular block (contiguous slots,
    # i.e. `slot_read` is a slice; same start; no padding): every decode step or prefill of
    # a single sequence. None otherwise (writes scatter through slot_index / write_pos).
    uniform_columns: slice | None
    positions: torch.Tensor  # [B, T] device: token positions (padding clamped in range)
    kv_len: int  # keys [0, kv_len) are read; max over the batch of starts + num_tokens
    # Whether some query may not see every key [0, kv_len): several tokens per sequence, or a
    # ragged batch. Query (b, t) sees keys j <= positions[b, t] (the C++ kernels read that rule
    # from `positions`; the Python layers take `mask`, built on first use).
    masked: bool
    cos: torch.Tensor  # [B, T, 1, head_dim]
    sin: torch.Tensor  # [B, T, 1, head_dim]

    @functools.cached_property
    def mask(self) -> torch.Tensor | None:
        """[B, 1, T, kv_len] bool (True = attend), or None when every query sees every key."""
        if not self.masked:
            return None
        keys = torch.arange(self.kv_len, device=self.positions.device)
        return keys.view(1, 1, 1, -1) <= self.positions[:, None, :, None]

    @property
    def batch_size(self) -> int:
        return len(self.slots)

    @property
    def width(self) -> int:
        return self.write_pos.shape[1]

    def last_token_index(self) -> torch.Tensor:
        """[B] index along T of each sequence's last real token (to pick its logits)."""
        return torch.from_numpy(self.num_tokens - 1).to(self.write_pos.device)


def plan_step(
    cache: KVCache,
    layer: int,
    slots: Sequence[int],
    num_tokens: Sequence[int] | int,
    rotary: RotaryTable,
) -> ForwardStep:
    """Plan appending `num_tokens` to each of `slots`, after the cache length of `layer`.

    Index arithmetic is done with numpy on the host (microseconds per op); tensors are made
    once at the end: this runs every step, and small-tensor dispatch would dominate it."""
    slots = tuple(int(s) for s in slots)
    if len(slots) == 1 and (isinstance(num_tokens, int) or len(num_tokens) == 1):
        count = num_tokens if isinstance(num_tokens, int) else int(num_tokens[0])
        return _plan_one_sequence(cache, layer, slots[0], count, rotary)
    if not slots:
        raise ValueError("a step needs at least one sequence")
    if len(set(slots)) != len(slots):
        raise ValueError(f"duplicate slots in a step: {slots}")
    starts = cache.starts(layer, slots)
    counts = np.full(len(slots), num_tokens, dtype=np.int64) if isinstance(num_tokens, int) \
        else np.asarray(num_tokens, dtype=np.int64)
    if counts.shape != starts.shape or (counts <= 0).any():
        raise ValueError(f"num_tokens must be one positive count per slot, got {counts.tolist()}")
    ends = starts + counts
    if (ends > cache.capacity).any():
        raise ValueError(
            f"context length limit: sequences would reach {ends.tolist()} tokens, cache holds {cache.capacity}"
        )
    width = int(counts.max())
    kv_len = int(ends.max())
    device = cache.keys[0].device

    offsets = np.arange(width, dtype=np.int64)
    raw_pos = starts[:, None] + offsets  # [B, T]
    is_pad = offsets[None, :] >= counts[:, None]
    write_pos = np.where(is_pad, cache.scratch_index, raw_pos)
    positions = np.minimum(raw_pos, cache.capacity - 1)

    ragged = bool((starts != starts[0]).any() or (counts != width).any())

    first = slots[0]
    contiguous = slots == tuple(range(first, first + len(slots)))
    slot_tensor = torch.tensor(slots, dtype=torch.int64, device=device)
    start = int(starts[0])
    uniform = contiguous and not ragged
    positions_tensor = torch.from_numpy(positions)
    cos, sin = rotary.lookup(positions_tensor, int(positions.max()))
    return ForwardStep(
        slots=slots,
        starts=starts,
        num_tokens=counts,
        ends=ends,
        slot_index=slot_tensor[:, None],
        slot_read=slice(first, first + len(slots)) if contiguous else slot_tensor,
        write_pos=torch.from_numpy(write_pos).to(device),
        uniform_columns=slice(start, start + width) if uniform else None,
        positions=positions_tensor.to(device),
        kv_len=kv_len,
        masked=width > 1 or ragged,
        cos=cos,
        sin=sin,
    )


def _plan_one_sequence(cache: KVCache, layer: int, slot: int, count: int, rotary: RotaryTable) -> ForwardStep:
    """`plan_step` for one sequence (every step at batch size 1): one block of `count` tokens
    at the positions after its cache length, in Python ints; cos/sin are views of the table.
    Same fields as the general path builds for this case."""
    if count <= 0:
        raise ValueError(f"num_tokens must be one positive count per slot, got {count}")
    start = cache.length(layer, slot)
    end = start + count
    if end > cache.capacity:
        raise ValueError(f"context length limit: sequences would reach {[end]} tokens, cache holds {cache.capacity}")
    positions = cache.position_row[:, start:end]  # [1, count], < capacity: no clamping
    cos, sin = rotary.rows(start, end)
    return ForwardStep(
        slots=(slot,),
        starts=np.array([start], dtype=np.int64),
        num_tokens=np.array([count], dtype=np.int64),
        ends=np.array([end], dtype=np.int64),
        slot_index=cache.slot_index(slot),
        slot_read=slice(slot, slot + 1),
        write_pos=positions,
        uniform_columns=slice(start, end),
        positions=positions,
        kv_len=end,
        masked=count > 1,
        cos=cos,
        sin=sin,
    )
