"""EngineProcess: the engine loop in a child process behind two pipes (no Ray)."""

import functools
import os
import queue
import signal
import time

import pytest
from hispec.model import load_model
from hispec.model.greedy import greedy_generate
from hispec.serving.engine_loop import Committed, Failed
from hispec.serving.engine_process import EngineProcess
from hispec.engine import EngineConfig, SpecEngine
from hispec.speculation import BatchPolicy, Hierarchy, Request
from tests.unit.spec_helpers import collect, drain, random_prompts
from tests.unit.tiny_checkpoints import make_checkpoint


def build_tiny(checkpoint, slots: int) -> SpecEngine:
    """Runs in the child (module level, so it pickles)."""
    model = load_model(checkpoint)
    return SpecEngine(model, Hierarchy(model.config.num_layers, (2, 4), (2, 2)), EngineConfig(max_batch_size=slots))


def build_missing() -> SpecEngine:
    raise FileNotFoundError("no checkpoint here")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("process")
    make_checkpoint(directory, "tied-gqa", num_layers=6, max_position_embeddings=4096)
    return directory


@pytest.fixture(scope="module")
def engine(checkpoint):
    process = EngineProcess(functools.partial(build_tiny, checkpoint, 3)).start(timeout_s=120)
    yield process
    process.stop()


def wait_idle(engine: EngineProcess, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while (snap := engine.snapshot()).active or snap.queued:
        assert time.monotonic() < deadline, f"engine still busy: {snap}"
        time.sleep(0.05)


def test_summary_describes_the_child_engine(engine):
    summary = engine.summary
    assert (summary.num_layers, summary.max_batch_size) == (6, 3)
    hierarchy = Hierarchy(6, (2, 4), (2, 2))
    assert summary.policy == BatchPolicy.fixed(hierarchy).describe() and summary.hierarchy == hierarchy
    assert engine.alive and engine.pid != os.getpid()


def test_concurrent_requests_equal_plain_greedy(engine, checkpoint):
    reference = load_model(checkpoint)
    prompts = random_prompts([3, 9, 1, 6, 12, 4, 7], vocab=reference.config.vocab_size)
    lengths = [17, 5, 23, 1, 11, 30, 8]
    streams = [collect(engine, Request(p, n, stop_token_ids=())) for p, n in zip(prompts, lengths)]
    for prompt, n, stream in zip(prompts, lengths, streams):  # 7 requests through 3 slots
        tokens, result = drain(stream)
        assert tokens == greedy_generate(reference, prompt, n)[0]
        assert result.finish_reason == "length"
    wait_idle(engine)
    assert engine.snapshot().slots == 3


def test_refused_request_fails_alone(engine):
    _, failed = drain(collect(engine, Request([10_000_000], 3)))
    assert isinstance(failed, Failed) and isinstance(failed.error, ValueError) and "token ids" in str(failed.error)
    tokens, _ = drain(collect(engine, Request([1, 2], 4, stop_token_ids=())))
    assert len(tokens) == 4


def test_abort_silences_the_sink_and_frees_the_slot(engine):
    events: queue.Queue = queue.Queue()
    request = Request([1, 2, 3], 3000, stop_token_ids=())
    engine.submit(request, events.put)
    first = events.get(timeout=30)
    assert isinstance(first, Committed)
    engine.abort(request.request_id)
    wait_idle(engine)
    while not events.empty():  # whatever was already on its way; never a finish
        event = events.get()
        assert isinstance(event, Committed) and event.result is None
    tokens, _ = drain(collect(engine, Request([4, 5], 3, stop_token_ids=())))
    assert len(tokens) == 3


def test_requests_must_not_carry_callbacks(engine):
    with pytest.raises(ValueError, match="sink"):
        engine.submit(Request([1], 2, on_tokens=print), lambda event: None)


def test_build_errors_surface_from_start():
    with pytest.raises(FileNotFoundError, match="no checkpoint here"):
        EngineProcess(build_missing).start(timeout_s=120)


def test_a_dead_child_fails_open_requests_and_refuses_new_ones(checkpoint):
    engine = EngineProcess(functools.partial(build_tiny, checkpoint, 1)).start(timeout_s=120)
    try:
        events = collect(engine, Request([1, 2], 4000, stop_token_ids=()))
        assert isinstance(events.get(timeout=30), Committed)
        os.kill(engine.pid, signal.SIGKILL)
        while True:
            event = events.get(timeout=30)
            if isinstance(event, Failed):
                break
        assert "engine process exited" in str(event.error)
        assert not engine.alive
        _, refused = drain(collect(engine, Request([1], 2)))
        assert isinstance(refused, Failed) and "not running" in str(refused.error)
    finally:
        engine.stop()


def test_a_failing_sink_does_not_stop_the_others(engine):
    def broken(event):
        raise RuntimeError("this event loop is closed")

    engine.submit(Request([7, 8], 5, stop_token_ids=()), broken)
    tokens, result = drain(collect(engine, Request([1, 2], 6, stop_token_ids=())))
    assert len(tokens) == 6 and result.finish_reason == "length" and engine.alive
