"""Static, preallocated per-layer KV cache with a valid length per (layer, sequence slot).

Memory is allocated once. A sequence lives in a slot; its tokens' keys/values sit at index =
token position. Appending writes at the positions after the valid length and moves it forward;
rollback only moves the length back (no copies): stale entries past the length are never
attended to (the causal mask stops at the query's position) and are overwritten by the next
append. Each layer has its own lengths because, in speculative decoding, shallow layers run
ahead of deep ones.

Lengths are control metadata and live on the host as a numpy array: the scheduler reads them
without a device sync, and each update costs a microsecond instead of a tensor op's dispatch.
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
        self.lengths = np.zeros((hi - lo, num_slots), dtype=np.int64)  # host

    @property
    def scratch_index(self) -> int:
        return self.capacity

    def _row(self, layer: int) -> int:
        if not self.layer_lo <= layer < self.layer_hi:
            raise IndexError(f"layer {layer} is not in this cache's range [{self.layer_lo}, {self.layer_hi})")
        return layer - self.layer_lo

    # ---- lengths -------------------------------------------------------------------------
    def length(self, layer: int, slot: int) -> int:
        return int(self.lengths[self._row(layer), slot])

    def layer_lengths(self, layer: int) -> np.ndarray:
        """[num_slots] valid lengths of one layer (a view; do not mutate)."""
        return self.lengths[self._row(layer)]

    def span(self, layers: tuple[int, int], slots: Sequence[int]) -> np.ndarray:
        """Valid lengths of `slots` in layers [lo, hi): [hi-lo, B]. For one slot (every step at
        batch size 1) a view [hi-lo] instead: no fancy-index copy, broadcastable the same way.
        Read-only for callers; `set_lengths` / `rollback` write."""
        lo, hi = layers
        rows = slice(self._row(lo), self._row(hi - 1) + 1)
        return self.lengths[rows, slots[0]] if len(slots) == 1 else self.lengths[rows, list(slots)]

    def set_lengths(self, layers: tuple[int, int], slots: Sequence[int], lengths: Sequence[int]) -> None:
        """Set the valid length of `slots` in layers [lo, hi) (used after a forward appended)."""
        if len(slots) == 1:  # plain ints and a view: this runs after every forward at batch size 1
            new = int(lengths[0])
            if not 0 <= new <= self.capacity:
                raise ValueError(f"lengths {[new]} outside [0, {self.capacity}]")
            self.span(layers, slots)[...] = new
            return
        new = np.asarray(lengths, dtype=np.int64)
        if new.size and (new.min() < 0 or new.max() > self.capacity):
            raise ValueError(f"lengths {new.tolist()} outside [0, {self.capacity}]")
        lo, hi = layers
        self.lengths[self._row(lo) : self._row(hi - 1) + 1, list(slots)] = new

    def rollback(self, layers: tuple[int, int], slots: Sequence[int], lengths: Sequence[int]) -> None:
        """Move the valid length of `slots` in layers [lo, hi) back to `lengths` (no copy)."""
        current = self.span(layers, slots)
        if len(slots) == 1:  # a view and a plain int: this runs after every rejection at batch size 1
            new = int(lengths[0])
            if new < 0 or new > current.min():
                raise ValueError(f"rollback cannot extend or go below 0: {[new]} vs {current.tolist()}")
            current[...] = new
            return
        if (np.asarray(lengths) > current).any():
            raise ValueError(f"rollback cannot extend: {list(lengths)} > {current.tolist()}")
        self.set_lengths(layers, slots, lengths)

    def release(self, slots: Sequence[int]) -> None:
        """Forget the sequences in `slots` (all layers): the slots can take new sequences."""
        self.lengths[:, list(slots)] = 0

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
        n = int(self.lengths[row, slot])
        return self.keys[row][slot, :, :n], self.values[row][slot, :, :n]
