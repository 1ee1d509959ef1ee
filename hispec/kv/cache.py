"""Static, preallocated per-layer KV cache with a valid length per (layer, sequence slot).

Memory is allocated once. A sequence lives in a slot; its tokens' keys/values sit at index =
token position. Appending writes at the positions after the valid length and moves it forward;
rollback only moves the length back (no copies): stale entries past the length are never
attended to (the causal mask stops at the query's position) and are overwritten by the next
append. Each layer has its own lengths because, in speculative decoding, shallow layers run
ahead of deep ones.

Lengths are control metadata and live on the host as Python ints, one list per slot: the
scheduler reads them without a device sync, and the updates that follow every forward (one
slot, a range of layers) are list slice assignments. Right after a forward has streamed the
weights through the CPU caches, a numpy call on a small array costs ~10-20 us; these cost ~1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from hispec.model.step import ForwardStep


class KVCache:
    """KV tensors for layers [layer_lo, layer_hi) of a model, `num_slots` sequences.

    keys[i] / values[i]: [num_slots, n_kv_heads, capacity + 1, head_dim] for layer layer_lo + i.
    The extra last column is a scratch column: padding tokens of a ragged batch write there.
    """

    def __init__(
        self,
        *,
        layer_range: tuple[int, int],
        num_slots: int,
        capacity: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        lo, hi = layer_range
        if not 0 <= lo < hi:
            raise ValueError(f"bad layer range {layer_range}")
        if num_slots <= 0 or capacity <= 0:
            raise ValueError("num_slots and capacity must be positive")
        self.layer_lo, self.layer_hi = lo, hi
        self.num_slots = num_slots
        self.capacity = capacity
        shape = (num_slots, num_kv_heads, capacity + 1, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(hi - lo)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(hi - lo)]
        self._lengths = [[0] * (hi - lo) for _ in range(num_slots)]  # [slot][layer - layer_lo], host
        # Index tensors a one-sequence step plan slices (read-only): positions [1, capacity], and a
        # [1, 1] index per slot. Made once: tensor creation costs more than the plan's arithmetic.
        self.position_row = torch.arange(capacity, device=device)[None, :]
        self._slot_indices = [torch.tensor([[slot]], device=device) for slot in range(num_slots)]

    @property
    def nbytes(self) -> int:
        """Bytes of every K and V tensor."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K and V one token takes in all of this cache's layers."""
        return self.nbytes // (self.num_slots * (self.capacity + 1))

    @property
    def scratch_index(self) -> int:
        return self.capacity

    def _row(self, layer: int) -> int:
        if not self.layer_lo <= layer < self.layer_hi:
            raise IndexError(f"layer {layer} is not in this cache's range [{self.layer_lo}, {self.layer_hi})")
        return layer - self.layer_lo

    def _rows(self, layers: tuple[int, int]) -> slice:
        lo, hi = layers
        return slice(self._row(lo), self._row(hi - 1) + 1)

    def slot_index(self, slot: int) -> torch.Tensor:
        """[1, 1] int64 index of `slot` (read-only)."""
        return self._slot_indices[slot]

    # ---- lengths -------------------------------------------------------------------------
    @property
    def lengths(self) -> np.ndarray:
        """[layers, num_slots] valid lengths (a copy, for inspection)."""
        return np.array(self._lengths, dtype=np.int64).reshape(self.num_slots, -1).T.copy()

    def length(self, layer: int, slot: int) -> int:
        return self._lengths[slot][self._row(layer)]

    def starts(self, layer: int, slots: Sequence[int]) -> np.ndarray:
        """[B] valid lengths of `slots` in one layer."""
        row = self._row(layer)
        return np.array([self._lengths[s][row] for s in slots], dtype=np.int64)

    def holds(self, layers: tuple[int, int], slots: Sequence[int], lengths: Sequence[int]) -> bool:
        """Whether every layer in [lo, hi) holds exactly lengths[b] tokens of slots[b]."""
        rows = self._rows(layers)
        width = rows.stop - rows.start
        return all(self._lengths[s][rows].count(int(n)) == width for s, n in zip(slots, lengths, strict=True))

    def set_lengths(self, layers: tuple[int, int], slots: Sequence[int], lengths: Sequence[int]) -> None:
        """Set the valid length of `slots` in layers [lo, hi) (used after a forward appended)."""
        rows = self._rows(layers)
        new = [int(n) for n in lengths]
        if any(not 0 <= n <= self.capacity for n in new):
            raise ValueError(f"lengths {new} outside [0, {self.capacity}]")
        for slot, n in zip(slots, new, strict=True):
            self._lengths[slot][rows] = [n] * (rows.stop - rows.start)

    def rollback(self, layers: tuple[int, int], slots: Sequence[int], lengths: Sequence[int]) -> None:
        """Move the valid length of `slots` in layers [lo, hi) back to `lengths` (no copy)."""
        rows = self._rows(layers)
        for slot, n in zip(slots, lengths, strict=True):
            if n > min(self._lengths[slot][rows]):
                raise ValueError(f"rollback cannot extend: {list(lengths)} > {self._lengths[slot][rows]}")
        self.set_lengths(layers, slots, lengths)

    def release(self, slots: Sequence[int]) -> None:
        """Forget the sequences in `slots` (all layers): the slots can take new sequences."""
        for slot in slots:
            self._lengths[slot] = [0] * (self.layer_hi - self.layer_lo)

    # ---- tensors -------------------------------------------------------------------------
    def write(self, layer: int, step: "ForwardStep", k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [B, T, n_kv_heads, head_dim] of a step at its tokens' positions."""
        row = self._row(layer)
        if step.uniform_columns is not None:  # one block: a strided copy, no scatter
            self.keys[row][step.slot_read, :, step.uniform_columns] = k.transpose(1, 2)
            self.values[row][step.slot_read, :, step.uniform_columns] = v.transpose(1, 2)
        else:
            self.keys[row][step.slot_index, :, step.write_pos] = k
            self.values[row][step.slot_index, :, step.write_pos] = v

    def read(self, layer: int, slots: slice | torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, n_kv_heads, kv_len, head_dim] of `slots`.

        A contiguous slot range is a view (no copy); a tensor of slot indices gathers (copies).
        """
        row = self._row(layer)
        k, v = self.keys[row], self.values[row]
        if isinstance(slots, slice):
            return k[slots, :, :kv_len], v[slots, :, :kv_len]
        return k[:, :, :kv_len].index_select(0, slots), v[:, :, :kv_len].index_select(0, slots)

    def slot_tensors(self, layer: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Valid keys and values [n_kv_heads, length, head_dim] of one slot (for tests, transfer)."""
        row = self._row(layer)
        n = self._lengths[slot][row]
        return self.keys[row][slot, :, :n], self.values[row][slot, :, :n]
