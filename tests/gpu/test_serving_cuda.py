"""deploy/hispec-gpu.yaml on a CUDA machine: with 2 GPUs as it is (each engine replica a 2-stage
pipeline whose stage actors take one GPU each, STRICT_PACK on this one node, hidden rows over NCCL;
the replica itself holds none), with 1 GPU as a single-process engine replica holding the GPU. Either
way the server answers exactly what plain greedy decoding of the full model gives (fp32, so no
reduced-precision shape effects) and reports GPU metrics. The config's checkpoint is the cluster's
model volume (/models/hispec-stdlib-ee); here it is the bundled copy of the same model."""

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

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def one_gpu_variant(config: dict) -> None:
    """The same application with a single-process engine replica that holds the one GPU."""
    args = config["applications"][0]["args"]
    args.update(pipeline_stages=1, stage_gpus=False)
    args.pop("placement_strategy", None)
    engine = next(d for d in config["applications"][0]["deployments"] if d["name"] == "HiSpecEngine")
    engine["ray_actor_options"] = {"num_cpus": 2, "num_gpus": 1}


@pytest.mark.parametrize("gpus", [2, 1], ids=["pipeline-2-gpus", "one-gpu"])
def test_gpu_config_serves_on_cuda(tmp_path, gpus):
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} CUDA device(s)")
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
    if gpus == 1:
        one_gpu_variant(config)
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
