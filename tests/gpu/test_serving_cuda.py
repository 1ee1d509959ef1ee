"""deploy/hispec-gpu.yaml on a CUDA machine with at least 2 GPUs (skipped below 2): each engine
replica is a 2-stage pipeline whose stage actors take one GPU each (STRICT_PACK on this one node,
hidden rows over NCCL; the replica itself holds none), answers exactly what plain greedy decoding of
the full model gives (fp32, so no reduced-precision shape effects), and reports GPU metrics. The
config's checkpoint is the cluster's model volume (/models/hispec-stdlib-ee); here it is the bundled
copy of the same model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
import requests
import torch
import yaml
from transformers import AutoTokenizer

from hispec.bench.prompts import bundled_heldout_prompts
from hispec.model import load_model
from hispec.models import DEFAULT_MODEL
from hispec.rpc import hispec_pb2 as pb
from hispec.rpc import hispec_pb2_grpc as rpc
from hispec.model.greedy import greedy_generate
from tests.serve_process import running_server

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.device_count() < 2,
                                 reason="needs 2 CUDA devices: deploy/hispec-gpu.yaml runs a 2-stage pipeline, one GPU per stage")]


def test_gpu_config_serves_on_cuda(tmp_path):
    prompts = bundled_heldout_prompts()[:3]
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    torch.backends.cuda.matmul.allow_tf32 = False
    model = load_model(DEFAULT_MODEL, dtype="float32", device="cuda")
    expected = [greedy_generate(model, tokenizer(prompt)["input_ids"], 32)[0] for prompt in prompts]
    del model
    torch.cuda.empty_cache()
    config = yaml.safe_load(Path("deploy/hispec-gpu.yaml").read_text())
    args = config["applications"][0]["args"]
    assert args["pipeline_stages"] == 2 and args["stage_gpus"] and args["placement_strategy"] == "STRICT_PACK"
    args["dtype"] = "float32"
    args["model"] = str(DEFAULT_MODEL)  # the same model as /models/hispec-stdlib-ee on a cluster
    fp32_config = tmp_path / "hispec-gpu-fp32.yaml"
    fp32_config.write_text(yaml.safe_dump(config))

    with running_server(str(fp32_config), tmp_path / "serve.log") as server:
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
