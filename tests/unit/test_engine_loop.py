"""EngineLoop: the engine on its own thread; requests join and leave between steps (no Ray)."""

import queue
import threading
import time

import pytest
from hispec.model import load_model
from hispec.model.greedy import greedy_generate
from hispec.serving.engine_loop import Committed, EngineLoop, Failed
from hispec.errors import EngineUnavailable
from hispec.engine import EngineConfig, ExecutorFailure, SpecEngine
from hispec.speculation import Hierarchy, Request, SamplingParams
from tests.unit.spec_helpers import collect, drain, random_prompts
from tests.unit.tiny_checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("loop")
    make_checkpoint(directory, "tied-gqa", num_layers=6, max_position_embeddings=4096)
    return directory


def start_loop(checkpoint, slots=3, hierarchy=((2, 4), (2, 2))):
    def build():
        model = load_model(checkpoint)
        return SpecEngine(model, Hierarchy(model.config.num_layers, *hierarchy), EngineConfig(max_batch_size=slots))

    return EngineLoop(build).start()


def test_concurrent_requests_equal_plain_greedy(checkpoint):
    loop = start_loop(checkpoint)
    try:
        prompts = random_prompts([3, 9, 1, 6, 12, 4, 7], vocab=loop.engine.model_config.vocab_size)
        lengths = [17, 5, 23, 1, 11, 30, 8]
        streams = [collect(loop, Request(p, n, stop_token_ids=())) for p, n in zip(prompts, lengths)]
        outputs = [drain(s) for s in streams]  # 7 requests through 3 slots
        reference = load_model(checkpoint)
        for prompt, n, (tokens, result) in zip(prompts, lengths, outputs):
            assert tokens == greedy_generate(reference, prompt, n)[0]
            assert result.finish_reason == "length"
        assert loop.snapshot().active == 0 and loop.snapshot().queued == 0
        assert sorted(loop.engine.free_slots) == [0, 1, 2]
    finally:
        loop.stop()


def test_abort_frees_the_slot_and_silences_the_sink(checkpoint):
    loop = start_loop(checkpoint, slots=1)
    try:
        seen = threading.Event()
        events: queue.Queue = queue.Queue()

        def sink(event):
            events.put(event)
            seen.set()

        request = Request([1, 2, 3], 400, stop_token_ids=())
        loop.submit(request, sink)
        assert seen.wait(30)
        loop.abort(request.request_id)
        waiting = collect(loop, Request([4, 5], 3, stop_token_ids=()))  # needs the only slot
        tokens, result = drain(waiting)
        assert len(tokens) == 3 and result.finish_reason == "length"
        while not events.empty():  # nothing after the abort can be a finish
            event = events.get()
            assert isinstance(event, Committed) and event.result is None
        assert loop.engine.free_slots == [0]
    finally:
        loop.stop()


def test_refused_request_fails_alone(checkpoint):
    loop = start_loop(checkpoint)
    try:
        vocab = loop.engine.model_config.vocab_size
        _, failed = drain(collect(loop, Request([vocab + 5], 3)))
        assert isinstance(failed, Failed) and "token ids" in str(failed.error)
        tokens, result = drain(collect(loop, Request([1, 2], 4, stop_token_ids=())))
        assert len(tokens) == 4
    finally:
        loop.stop()


def test_a_failing_step_fails_its_requests_and_the_loop_keeps_serving(checkpoint):
    loop = start_loop(checkpoint)
    try:
        engine = loop.engine
        original = engine.step
        calls = {"n": 0}

        def flaky_step():
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("boom")
            return original()

        engine.step = flaky_step
        _, failed = drain(collect(loop, Request([1, 2, 3], 50, stop_token_ids=())))
        assert isinstance(failed, Failed) and "boom" in str(failed.error)
        tokens, result = drain(collect(loop, Request([1, 2, 3], 6, stop_token_ids=())))
        assert len(tokens) == 6 and engine.num_running == 0 and sorted(engine.free_slots) == [0, 1, 2]
    finally:
        loop.stop()


def test_an_executor_failure_fails_every_request_and_stops_the_loop(checkpoint):
    """A dead executor (e.g. a pipeline stage died) cannot run anything more: every request the loop
    holds ends at once as EngineUnavailable (UNAVAILABLE / 503, naming the cause) and the loop stops,
    so its owner rebuilds the engine."""
    loop = start_loop(checkpoint)
    try:
        executor = loop.engine.executor
        original, calls = executor.execute, {"n": 0}

        def dying_execute(plan):
            calls["n"] += 1
            if calls["n"] == 5:
                raise ExecutorFailure("stage 1 is unreachable")
            return original(plan)

        executor.execute = dying_execute
        streams = [collect(loop, Request([1, 2, 3 + i], 200, stop_token_ids=())) for i in range(3)]
        for events in streams:
            _, failed = drain(events, timeout=10)
            assert isinstance(failed, Failed) and isinstance(failed.error, EngineUnavailable)
            assert "stage 1 is unreachable" in str(failed.error)
        loop._thread.join(10)  # noqa: SLF001
        assert not loop.alive
    finally:
        loop.stop()


def test_build_errors_surface_from_start():
    def build():
        raise FileNotFoundError("no checkpoint here")

    with pytest.raises(FileNotFoundError, match="no checkpoint here"):
        EngineLoop(build).start()


def test_stop_fails_what_is_left(checkpoint):
    loop = start_loop(checkpoint, slots=1)
    events = collect(loop, Request([1, 2], 4000, stop_token_ids=(), sampling=SamplingParams(temperature=1.0, seed=3)))
    events.get(timeout=30)  # running
    loop.stop()
    remaining = []
    while not events.empty():
        remaining.append(events.get())
    assert isinstance(remaining[-1], Failed) and "shutting down" in str(remaining[-1].error)
    assert not loop.alive


def test_a_fault_in_one_requests_handling_fails_no_other(checkpoint):
    """A request whose sink raises (its handler broke) is aborted alone: its KV slot frees and the
    requests decoded with it in the same steps finish as plain greedy decoding says."""
    loop = start_loop(checkpoint)
    try:
        prompts = random_prompts([4, 7, 5], vocab=loop.engine.model_config.vocab_size)
        model = load_model(checkpoint)
        healthy = [collect(loop, Request(p, 20, stop_token_ids=())) for p in prompts[:2]]

        def broken(event) -> None:
            raise RuntimeError("this handler is broken")

        loop.submit(Request(prompts[2], 20, stop_token_ids=(), request_id="broken"), broken)
        for events, prompt in zip(healthy, prompts[:2]):
            tokens, result = drain(events)
            assert tokens == greedy_generate(model, prompt, 20, ())[0] and result.finish_reason == "length"
        deadline = time.monotonic() + 10
        while loop.engine.num_running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loop.engine.num_running == 0 and loop.alive
    finally:
        loop.stop()
