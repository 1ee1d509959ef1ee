"""Tensors and control messages between the processes of a pipeline, over torch.distributed.

Ranks: 0 is the driver (the process running the scheduler), 1..S the stages. Two process groups,
made as objects (not torch.distributed's global default group, so one process can hold several
pipelines, and rebuild one after a failure):
  - control (gloo, every rank): plans to the stages, head outputs and errors back; pickled;
  - data (stages only): hidden rows [B, T, d] from stage s to s + 1, and KV blocks of a sequence
    when it moves. gloo on CPU; NCCL on CUDA (the rows never leave the GPUs).
A gloo point-to-point round trip of a few hidden rows costs ~0.12 ms here, a Ray actor call passing
the same tensor ~1.8 ms (`hispec bench-transport`, docs/pipeline/transport.md); Ray is used for
placement, set-up, health and failure, never per step.

A peer that dies closes its sockets: a blocked send or recv raises at once ("Connection closed
by peer"), so the driver reports the failure instead of hanging.
"""

from __future__ import annotations

import datetime
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist

# The control channel waits for the next plan for as long as the pipeline lives; failures come
# from closed connections, not from this timeout.
_IDLE_TIMEOUT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class GroupAddress:
    """Where the rendezvous store of one pipeline listens (it lives on the process that made it)."""

    host: str
    port: int
    world_size: int  # 1 driver + S stages
    data_backend: str  # "gloo" | "nccl"


def host_store(world_size: int, host: str) -> tuple[dist.TCPStore, int]:
    """A rendezvous store listening on a free port of this host: (store, port)."""
    store = dist.TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    return store, store.port


class Transport:
    """One process's end of a pipeline's groups. `rank` 0: the driver; s + 1: stage s."""

    def __init__(self, address: GroupAddress, rank: int, store: dist.TCPStore | None = None,
                 timeout: datetime.timedelta = _IDLE_TIMEOUT) -> None:
        self.address, self.rank = address, rank
        self.store = store or dist.TCPStore(address.host, address.port, address.world_size, is_master=False,
                                            timeout=datetime.timedelta(seconds=60))
        self.control = dist.ProcessGroupGloo(dist.PrefixStore("control", self.store), rank, address.world_size, timeout)
        self.data = None
        if rank > 0:  # stages only; stage s is rank s in the data group
            data_store = dist.PrefixStore(f"data-{address.data_backend}", self.store)
            size = address.world_size - 1
            if address.data_backend == "nccl":
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = timeout
                self.data = dist.ProcessGroupNCCL(data_store, rank - 1, size, options)
            else:
                self.data = dist.ProcessGroupGloo(data_store, rank - 1, size, timeout)

    # ---- control: pickled objects ----------------------------------------------------------
    # One message per object when it fits a frame (every plan and reply of a decoding step does):
    # an 8-byte length, then the pickle, padded to FRAME bytes. Larger objects (a long prompt's
    # prefill, a KV snapshot) send the rest as a second message of the exact size. A message costs a
    # wake-up of gloo's I/O thread on each side, which on a busy 2-core machine costs more than the
    # padding: two messages per round trip instead of four took a HiSpec step at batch 1 from 2.9 to
    # 1.9 ms in the pipeline (235 -> 363 tok/s, measured back to back).
    FRAME = 16384

    def send_object(self, obj, *dsts: int) -> int:
        """Pickle `obj` once and send it to every rank in `dsts`; returns its size in bytes."""
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        head = len(payload).to_bytes(8, "little") + payload[: self.FRAME - 8]
        frame = torch.frombuffer(bytearray(head.ljust(self.FRAME, b"\0")), dtype=torch.uint8)
        rest = torch.frombuffer(bytearray(payload[self.FRAME - 8 :]), dtype=torch.uint8) \
            if len(payload) > self.FRAME - 8 else None
        for dst in dsts:
            self.control.send([frame], dst, 0).wait()
            if rest is not None:
                self.control.send([rest], dst, 1).wait()
        return len(payload)

    def recv_object(self, src: int):
        frame = torch.empty(self.FRAME, dtype=torch.uint8)
        self.control.recv([frame], src, 0).wait()
        data = frame.numpy().tobytes()
        size = int.from_bytes(data[:8], "little")
        payload = data[8 : 8 + size]
        if size > self.FRAME - 8:
            rest = torch.empty(size - (self.FRAME - 8), dtype=torch.uint8)
            self.control.recv([rest], src, 1).wait()
            payload += rest.numpy().tobytes()
        return pickle.loads(payload)

    # ---- data: tensors between neighbouring stages --------------------------------------------
    def send_tensor(self, tensor: torch.Tensor, dst_stage: int) -> None:
        self.data.send([tensor.contiguous()], dst_stage, 2).wait()

    def recv_tensor(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, src_stage: int) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype, device=device)
        self.data.recv([tensor], src_stage, 2).wait()
        return tensor

    def close(self) -> None:
        for group in (self.control, self.data):
            if group is not None and hasattr(group, "shutdown"):
                try:
                    group.shutdown()
                except Exception:  # noqa: BLE001 - closing a group whose peers are gone
                    pass


class DistributedLink:
    """`StageLink` of stage `stage` over a transport's data group (rows to s + 1, from s - 1)."""

    def __init__(self, transport: Transport, stage: int) -> None:
        self.transport, self.stage = transport, stage

    def send(self, hidden: torch.Tensor) -> None:
        self.transport.send_tensor(hidden, self.stage + 1)

    def recv(self, shape, dtype, device) -> torch.Tensor:
        return self.transport.recv_tensor(tuple(shape), dtype, device, self.stage - 1)


def send_kv_block(transport: Transport, cache, slot: int, layers: tuple[int, int], dst_stage: int) -> None:
    """Move one sequence's valid KV of `layers` to another stage (e.g. when a sequence changes
    pipelines or a stage is rebalanced): per layer, keys and values [n_kv_heads, length, head_dim].
    The receiver knows the lengths from the scheduler."""
    for layer in range(*layers):
        keys, values = cache.slot_tensors(layer, slot)
        transport.send_tensor(keys, dst_stage)
        transport.send_tensor(values, dst_stage)


def recv_kv_block(transport: Transport, cache, slot: int, layers: tuple[int, int], length: int, src_stage: int) -> None:
    """Receive what `send_kv_block` sent into `slot` of `cache` and set its lengths."""
    for layer in range(*layers):
        row = layer - cache.layer_lo
        k, v = cache.keys[row], cache.values[row]
        shape = (k.shape[1], length, k.shape[3])
        k[slot, :, :length] = transport.recv_tensor(shape, k.dtype, k.device, src_stage)
        v[slot, :, :length] = transport.recv_tensor(shape, v.dtype, v.device, src_stage)
    cache.set_lengths(layers, [slot], [length])
