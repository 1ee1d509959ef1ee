"""deploy/hispec-gpu.yaml on a CUDA machine (skipped without CUDA): the engine replica takes the
GPU, answers like the engine does in-process, and reports GPU metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
import requests
import torch
from transformers import AutoTokenizer

from hispec.bench.prompts import bundled_heldout_prompts
from hispec.model import load_model
from hispec.models import DEFAULT_MODEL
from hispec.rpc import hispec_pb2 as pb
from hispec.rpc import hispec_pb2_grpc as rpc
from hispec.engine import EngineConfig, SpecEngine
from hispec.speculation import Request, resolve_policy
from tests.serve_process import running_server

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_gpu_config_serves_on_cuda(tmp_path):
    prompts = bundled_heldout_prompts()[:3]
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    model = load_model(DEFAULT_MODEL, dtype="bfloat16", device="cuda")
    policy = resolve_policy("auto", model.config.num_layers, DEFAULT_MODEL)
    expected = []
    for prompt in prompts:  # one at a time, as the server will see them
        engine = SpecEngine(model, policy, EngineConfig(max_batch_size=64))
        expected.append(engine.generate([Request(tokenizer(prompt)["input_ids"], 32)])[0].token_ids)
    del model
    torch.cuda.empty_cache()

    with running_server("deploy/hispec-gpu.yaml", tmp_path / "serve.log") as server:
        with grpc.insecure_channel(server.grpc) as channel:
            stub = rpc.HiSpecStub(channel)
            for prompt, ids in zip(prompts, expected):
                assert list(stub.Generate(pb.GenerateRequest(prompt=prompt, max_new_tokens=32)).token_ids) == ids
        discovery = Path("/tmp/ray/prom_metrics_service_discovery.json")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            targets = [t for group in json.loads(discovery.read_text()) for t in group["targets"]]
            text = "\n".join(requests.get(f"http://{t}/metrics", timeout=10).text for t in targets)
            if "ray_hispec_gpu_memory_used_bytes" in text:
                break
            time.sleep(3)
        assert "ray_hispec_gpu_memory_used_bytes" in text and "ray_hispec_gpu_utilization_percent" in text
