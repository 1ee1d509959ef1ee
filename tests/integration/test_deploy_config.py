"""deploy/hispec.yaml is a valid Serve config whose application builds (no cluster needed)."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from hispec.cluster import local_model_args
from hispec.models import DEFAULT_MODEL
from hispec.serving.app import build_app
from hispec.serving.config import AppArgs

ROOT = Path(__file__).resolve().parents[2]


def test_compare_config_serves_both_ways_within_two_cores():
    """deploy/hispec-compare.yaml: one process and a 2-stage pipeline, side by side, their CPU
    reservations (engine replicas, stages, ingresses) within this machine's 2 cores."""
    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy" / "hispec-compare.yaml").read_text()))
    apps = {app.name: app for app in config.applications}
    assert set(apps) == {"hispec", "hispec-pp2"}
    assert {app.route_prefix for app in apps.values()} == {"/", "/pp2"}
    reserved = 0.0
    for app in apps.values():
        args = AppArgs.model_validate(app.args)
        built = build_app(app.args)
        assert args.pipeline_stages == (2 if app.name == "hispec-pp2" else 1)
        for deployment in app.deployments:
            options = deployment.model_dump(exclude_unset=True).get("ray_actor_options", {})
            reserved += options.get("num_cpus", 0)
        if args.pipeline_stages > 1:
            reserved += args.replica_cpus + args.pipeline_stages * args.stage_cpus
        assert built is not None
    assert reserved <= 2


@pytest.mark.parametrize("name", ["hispec.yaml", "hispec-gpu.yaml", "hispec-pipeline.yaml"])
def test_serve_config_validates_and_builds(name):
    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy" / name).read_text()))
    assert config.grpc_options.port == 9000 and config.http_options.port == 8000
    assert config.grpc_options.grpc_servicer_functions == ["hispec.rpc.servicer.add_HiSpecServicer_to_server"]
    (app,) = config.applications
    assert app.import_path == "hispec.serving.app:build_app"
    # validates the args with pydantic; hispec-gpu.yaml reads its checkpoint from the cluster's model
    # volume (/models/hispec-stdlib-ee): here, the bundled copy of the same model
    build_app(local_model_args(app.args, ("/models", DEFAULT_MODEL.parent)))
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"HiSpecEngine", "HiSpecIngress"}
    assert deployments["HiSpecEngine"].autoscaling_config["min_replicas"] >= 1


def test_bad_args_are_refused_by_name():
    with pytest.raises(ValueError, match="max_batch_size"):
        build_app({"max_batch_size": 0})
    with pytest.raises(ValueError, match="no checkpoint"):
        build_app({"model": "/nonexistent"})
    with pytest.raises(ValueError, match="takes no exits"):
        AppArgs(method="ar", exits=(2,))
    with pytest.raises(ValueError, match="frobnicate"):
        build_app({"frobnicate": 1})


def test_pipeline_args_reserve_one_bundle_per_stage():
    args = AppArgs(pipeline_stages=3, stage_cpus=0.25, replica_cpus=0.5)
    assert args.placement_bundles() == [{"CPU": 0.5}, {"CPU": 0.25}, {"CPU": 0.25}, {"CPU": 0.25}]
    gpu = AppArgs(pipeline_stages=2, stage_gpus=True, device="cuda")
    assert gpu.placement_bundles() == [{"CPU": 0.5}, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]
    assert "GPU" not in gpu.placement_bundles()[0]  # the replica never holds a GPU its stages need
    assert AppArgs().placement_bundles() is None
    app = build_app({"pipeline_stages": 2})
    engine = app._bound_deployment.init_args[0]._bound_deployment  # noqa: SLF001 - what Serve will deploy
    assert engine._replica_config.placement_group_bundles == [{"CPU": 0.5}] * 3  # noqa: SLF001
    assert engine._replica_config.ray_actor_options["num_cpus"] == 0.5  # fits bundle 0  # noqa: SLF001
    with pytest.raises(ValueError, match="pipeline_stages"):
        AppArgs(pipeline_stages=17)  # the bundled model has 16 layers
    with pytest.raises(ValueError, match="pipeline_stages"):
        AppArgs(pipeline_stages=0)
    with pytest.raises(ValueError, match="stage_gpus"):
        AppArgs(pipeline_stages=2, stage_gpus=True, device="cpu")


def test_placement_strategy_reaches_the_engine_deployment():
    app = build_app({"pipeline_stages": 2, "placement_strategy": "STRICT_PACK"})
    engine = app._bound_deployment.init_args[0]._bound_deployment  # noqa: SLF001
    assert engine._replica_config.placement_group_strategy == "STRICT_PACK"  # noqa: SLF001
    assert AppArgs(pipeline_stages=2).placement_strategy == "PACK"
    with pytest.raises(ValueError, match="placement_strategy"):
        AppArgs(pipeline_stages=2, placement_strategy="STRICT_SPREAD")
    with pytest.raises(ValueError, match="placement_strategy STRICT_PACK applies to pipelines"):
        AppArgs(placement_strategy="STRICT_PACK")  # a single-process engine reserves no placement group
