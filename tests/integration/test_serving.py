"""The served application, called the ways users call it: Python gRPC (unary and stream), curl,
and the openai client. Greedy results must equal plain greedy decoding of the bundled model."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import grpc
import pytest
import requests
from openai import OpenAI
from transformers import AutoTokenizer

from hispec.bench.prompts import bundled_heldout_prompts
from hispec.model import load_model
from hispec.model.greedy import greedy_generate
from hispec.models import DEFAULT_MODEL
from hispec.rpc import hispec_pb2 as pb
from hispec.rpc import hispec_pb2_grpc as rpc

pytestmark = pytest.mark.slow

PROMPTS = bundled_heldout_prompts()[:6]
MAX_NEW = 40


@pytest.fixture(scope="module")
def expected() -> dict[str, tuple[list[int], str]]:
    """Plain greedy decoding (the reference loop, no speculation): prompt -> (token ids, text)."""
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    model = load_model(DEFAULT_MODEL)
    out = {}
    for prompt in PROMPTS:
        ids, _ = greedy_generate(model, tokenizer(prompt)["input_ids"], MAX_NEW, model.config.eos_token_ids)
        out[prompt] = (ids, tokenizer.decode(ids, skip_special_tokens=True))
    return out


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc) as channel:
        yield rpc.HiSpecStub(channel)


def test_grpc_generate_equals_greedy(stub, expected):
    for prompt in PROMPTS:
        response = stub.Generate(pb.GenerateRequest(prompt=prompt, max_new_tokens=MAX_NEW, request_id="r1"))
        ids, text = expected[prompt]
        assert list(response.token_ids) == ids and response.text == text
        assert response.request_id == "r1"
        assert response.finish_reason in ("length", "stop")
        assert response.usage.completion_tokens == len(ids)
        assert response.usage.total_tokens == response.usage.prompt_tokens + len(ids)
        levels = response.stats.levels
        assert levels[-1].role == "target" and levels[-1].exit_layer == 16
        assert all(0 <= lv.acceptance_rate <= 1 for lv in levels[1:])


def test_grpc_stream_equals_greedy(stub, expected):
    for prompt in PROMPTS[:3]:
        messages = list(stub.GenerateStream(pb.GenerateRequest(prompt=prompt, max_new_tokens=MAX_NEW)))
        ids, text = expected[prompt]
        assert [t for m in messages for t in m.token_ids] == ids
        assert "".join(m.text for m in messages) == text
        assert len(messages) > 1  # it streams
        assert all(m.finish_reason == "" and not m.HasField("usage") for m in messages[:-1])
        last = messages[-1]
        assert last.finish_reason and last.usage.completion_tokens == len(ids) and last.stats.hierarchy


def test_grpc_stop_strings(stub, expected):
    prompt = PROMPTS[0]
    ids, text = expected[prompt]
    stop = text[len(text) // 2:][:3]
    assert stop.strip(), "pick a stop string that occurs in the continuation"
    for call in ("unary", "stream"):
        request = pb.GenerateRequest(prompt=prompt, max_new_tokens=MAX_NEW, stop=[stop])
        if call == "unary":
            response = stub.Generate(request)
            got_text, finish = response.text, response.finish_reason
        else:
            messages = list(stub.GenerateStream(request))
            got_text, finish = "".join(m.text for m in messages), messages[-1].finish_reason
        assert got_text == text[: text.index(stop)] and finish == "stop"


def test_grpc_sampling_is_reproducible_per_seed(stub):
    request = pb.GenerateRequest(prompt=PROMPTS[1], max_new_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=7)
    first, second = stub.Generate(request), stub.Generate(request)
    assert list(first.token_ids) == list(second.token_ids) and len(first.token_ids) > 0


def test_model_info_and_health(stub, server):
    info = stub.ModelInfo(pb.ModelInfoRequest())
    assert info.model == "hispec-stdlib-ee" and info.num_layers == 16 and info.max_context == 512
    assert info.max_batch_size == 16 and info.hierarchies
    assert stub.Health(pb.HealthRequest()).serving
    assert requests.get(f"{server.http}/healthz", timeout=10).json()["status"] == "ok"
    models = requests.get(f"{server.http}/v1/models", timeout=10).json()
    assert models["data"][0]["id"] == "hispec-stdlib-ee" and models["data"][0]["max_model_len"] == 512


def _curl(*args: str) -> str:
    return subprocess.run(["curl", "-sS", "--fail-with-body", *args], check=True, capture_output=True, text=True,
                          timeout=120).stdout


def test_curl_completions(server, expected):
    prompt = PROMPTS[2]
    ids, text = expected[prompt]
    body = json.dumps({"model": "hispec-stdlib-ee", "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0})
    answer = json.loads(_curl(f"{server.http}/v1/completions", "-H", "Content-Type: application/json", "-d", body))
    choice = answer["choices"][0]
    assert choice["text"] == text and choice["hispec"]["token_ids"] == ids
    assert answer["object"] == "text_completion" and answer["usage"]["completion_tokens"] == len(ids)

    stream_body = json.dumps({"prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0, "stream": True,
                              "stream_options": {"include_usage": True}})
    raw = _curl("-N", f"{server.http}/v1/completions", "-H", "Content-Type: application/json", "-d", stream_body)
    events = [line[len("data: "):] for line in raw.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == len(ids) and chunks[-1]["choices"] == []
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == text
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_openai_client(server, expected):
    client = OpenAI(base_url=f"{server.http}/v1", api_key="unused")
    prompt = PROMPTS[3]
    ids, text = expected[prompt]
    completion = client.completions.create(model="hispec-stdlib-ee", prompt=prompt, max_tokens=MAX_NEW, temperature=0)
    assert completion.choices[0].text == text
    assert completion.usage.completion_tokens == len(ids)
    streamed = client.completions.create(model="hispec-stdlib-ee", prompt=prompt, max_tokens=MAX_NEW, temperature=0,
                                         stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == text
    several = client.completions.create(model="hispec-stdlib-ee", prompt=PROMPTS[:2], max_tokens=MAX_NEW,
                                        temperature=0)
    assert [c.text for c in sorted(several.choices, key=lambda c: c.index)] == [expected[p][1] for p in PROMPTS[:2]]


def test_concurrent_streams_are_batched_and_exact(server, expected):
    """8 concurrent streams (as in the throughput benchmark) still give every prompt its greedy output,
    and the engine decodes them together."""
    from hispec.rpc import hispec_pb2_grpc as rpc_async

    peak = {"active": 0}

    async def one(stub, prompt):
        ids = []
        async for message in stub.GenerateStream(pb.GenerateRequest(prompt=prompt, max_new_tokens=MAX_NEW)):
            ids += message.token_ids
        return prompt, ids

    async def watch(stub, done):
        while not done.is_set():
            peak["active"] = max(peak["active"], (await stub.Health(pb.HealthRequest())).active_sequences)
            await asyncio.sleep(0.05)

    async def main():
        async with grpc.aio.insecure_channel(server.grpc) as channel:
            stub = rpc_async.HiSpecStub(channel)
            done = asyncio.Event()
            watcher = asyncio.create_task(watch(stub, done))
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
            results = await asyncio.gather(*(one(stub, p) for p in prompts))
            done.set()
            await watcher
            return results

    for prompt, ids in asyncio.run(main()):
        assert ids == expected[prompt][0]
    assert peak["active"] >= 4, f"the engine never held more than {peak['active']} sequences at once"


def _wait_idle(stub, timeout=30.0) -> pb.HealthResponse:
    deadline = time.monotonic() + timeout
    while True:
        health = stub.Health(pb.HealthRequest())
        if (health.active_sequences == 0 and health.queued_requests == 0) or time.monotonic() > deadline:
            return health
        time.sleep(0.2)


def test_client_going_away_frees_its_sequence(stub, server):
    stream = stub.GenerateStream(pb.GenerateRequest(prompt=PROMPTS[0], max_new_tokens=400, stop=["\x00never"]))
    next(stream)
    assert stub.Health(pb.HealthRequest()).active_sequences >= 1
    stream.cancel()
    health = _wait_idle(stub)
    assert health.active_sequences == 0 and health.queued_requests == 0

    response = requests.post(f"{server.http}/v1/completions", stream=True, timeout=60,
                             json={"prompt": PROMPTS[1], "max_tokens": 400, "temperature": 0, "stream": True})
    next(response.iter_lines())
    response.close()
    health = _wait_idle(stub)
    assert health.active_sequences == 0 and health.queued_requests == 0
