"""The pipeline's transport without Ray: a driver and two stages as threads of this process, each
with its own gloo process groups over one rendezvous store (as the stage actors have)."""

from __future__ import annotations

import threading

import pytest
import torch

from hispec.engine.plan import Feed, Forward, StepPlan
from hispec.engine.transport import (
    DistributedLink, GroupAddress, Transport, host_store, recv_kv_block, send_kv_block,
)
from hispec.kv.cache import KVCache


def run_ranks(*roles):
    """Run role(rank_transport) for ranks 0..n-1 on threads; re-raise the first failure."""
    store, port = host_store(len(roles), "127.0.0.1")
    address = GroupAddress("127.0.0.1", port, len(roles), "gloo")
    results, errors = [None] * len(roles), []

    def run(rank):
        transport = Transport(address, rank, store if rank == 0 else None)
        try:
            results[rank] = roles[rank](transport)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            transport.close()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(roles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    if errors:
        raise errors[0]
    return results


def test_plans_go_out_and_replies_come_back():
    plan = StepPlan(forwards=(Forward(0, 4, (Feed(2, 17, 1, 1, (42,)),)),))

    def driver(t):
        t.send_object(plan, 1, 2)
        return [t.recv_object(1), t.recv_object(2)]

    def stage(t):
        got = t.recv_object(0)
        t.send_object({"stage": t.rank, "plan_ok": got == plan}, 0)

    replies, _, _ = run_ranks(driver, stage, stage)
    assert replies == [{"stage": 1, "plan_ok": True}, {"stage": 2, "plan_ok": True}]


@pytest.mark.parametrize("size", [0, Transport.FRAME - 8 - 40, Transport.FRAME + 5, 3 * Transport.FRAME])
def test_objects_of_any_size_cross_in_one_frame_or_two(size):
    """Small objects travel as one padded frame; larger ones send the rest as a second message."""
    obj = {"blob": bytes(range(256)) * (size // 256) + b"x" * (size % 256)}

    def driver(t):
        t.send_object(obj, 1)
        return t.recv_object(1)

    def stage(t):
        t.send_object(t.recv_object(0), 0)

    echoed, _ = run_ranks(driver, stage)
    assert echoed == obj


def test_hidden_rows_flow_from_stage_to_stage():
    rows = torch.randn(3, 5, 16)

    def stage0(t):
        DistributedLink(t, 0).send(rows[:, :4])  # a non-contiguous view goes out as is

    def stage1(t):
        return DistributedLink(t, 1).recv((3, 4, 16), torch.float32, torch.device("cpu"))

    _, _, got = run_ranks(lambda t: None, stage0, stage1)
    torch.testing.assert_close(got, rows[:, :4], rtol=0, atol=0)


@pytest.mark.parametrize("length", [1, 7])
def test_a_sequence_kv_block_moves_between_stages(length):
    def cache():
        return KVCache(layer_range=(2, 5), num_slots=4, capacity=16, num_kv_heads=2, head_dim=8)

    source = cache()
    for row in range(3):
        source.keys[row].normal_()
        source.values[row].normal_()
    source.set_lengths((2, 5), [1], [length])
    target = cache()

    def stage0(t):
        send_kv_block(t, source, slot=1, layers=(2, 5), dst_stage=1)

    def stage1(t):
        recv_kv_block(t, target, slot=3, layers=(2, 5), length=length, src_stage=0)

    run_ranks(lambda t: None, stage0, stage1)
    for layer in range(2, 5):
        assert target.length(layer, 3) == length
        for a, b in zip(source.slot_tensors(layer, 1), target.slot_tensors(layer, 3)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
