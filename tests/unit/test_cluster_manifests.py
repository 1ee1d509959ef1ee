"""cluster/ and ray_config.yaml, checked offline (no cluster, no Ray runtime): every RayService manifest
against KubeRay's CRD schema and rules, its serveConfigV2 against Ray Serve's schema and by building
the application, ray_config.yaml against Ray's cluster-launcher schema, serveConfigV2 against
deploy/hispec-gpu.yaml (render / --check), and each validator refusing a broken copy."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import ray
import yaml

from hispec import cluster
from hispec.cli import SUBCOMMANDS
from hispec.models import DEFAULT_MODEL
from hispec.serving.app import build_app

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT.parent / "shared" / "kuberay-crds" / "ray.io_rayservices.yaml"
DEPLOY = ROOT / "deploy" / "hispec-gpu.yaml"
MANIFEST = ROOT / "cluster" / "rayservice.yaml"
MODEL_ROOT = (cluster.MODEL_ROOT, DEFAULT_MODEL.parent)


@pytest.fixture(scope="module")
def schema() -> dict:
    return cluster.load_schema(ROOT / cluster.DEFAULT_SCHEMA)


@pytest.fixture()
def manifest() -> dict:
    (doc,) = yaml.safe_load_all(MANIFEST.read_text())
    return doc


@pytest.fixture()
def serve_config() -> dict:
    return yaml.safe_load(DEPLOY.read_text())


def errors_of(doc, schema) -> list[str]:
    return cluster.manifest_errors(doc, schema, MODEL_ROOT, ray.__version__)


def with_serve_config(doc: dict, config: dict) -> dict:
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    return doc


# --- the manifests as they are -----------------------------------------------------------------------

def test_every_manifest_in_cluster_validates(schema):
    manifests = sorted((ROOT / "cluster").glob("*.yaml"))
    assert manifests, "cluster/ holds no manifest"
    for path in manifests:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert docs and all(d.get("kind") == "RayService" for d in docs), f"{path.name}: only RayServices here"
        for doc in docs:
            assert errors_of(doc, schema) == [], path.name


def test_stored_schema_is_the_kuberay_crd_extract():
    schemas = ROOT / "cluster" / "schemas"
    assert "Apache License" in (schemas / "LICENSE").read_text()
    notice = (schemas / "README.md").read_text()
    assert "ray-project/kuberay" in notice and "Apache" in notice and "v1.7" in notice
    if not CRD.exists():
        pytest.skip(f"{CRD} not here: cannot repeat the extraction")
    import importlib.util

    spec = importlib.util.spec_from_file_location("extract", schemas / "extract.py")
    extract = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extract)
    assert extract.dump(extract.extract(CRD)) == (schemas / "rayservice.v1.schema.json").read_text()


def test_serve_config_v2_is_the_gpu_application(manifest):
    text = manifest["spec"]["serveConfigV2"]
    assert cluster.canonical(text) == cluster.canonical(DEPLOY.read_text())
    config = yaml.safe_load(text)
    assert cluster.serve_config_errors(config) == []
    (app_schema,) = config["applications"]
    args = app_schema["args"]
    assert args["model"].startswith("/models/") and args["device"] == "cuda"
    assert args["pipeline_stages"] == 2 and args["stage_gpus"] is True and args["placement_strategy"] == "STRICT_PACK"
    app = build_app(cluster.local_model_args(args, MODEL_ROOT))
    engine = app._bound_deployment.init_args[0]._bound_deployment  # noqa: SLF001 - what Serve will deploy
    replica = engine._replica_config  # noqa: SLF001
    assert replica.placement_group_strategy == "STRICT_PACK"
    assert replica.placement_group_bundles == [{"CPU": 2.0}, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]
    assert replica.ray_actor_options["num_cpus"] == 2.0 and not replica.ray_actor_options.get("num_gpus")
    (engine_yaml,) = [d for d in app_schema["deployments"] if d["name"] == "HiSpecEngine"]
    assert "ray_actor_options" not in engine_yaml  # it would replace the replica's bundle-0 sizing


def test_manifest_shape(manifest):
    spec = manifest["spec"]
    cluster_spec = spec["rayClusterConfig"]
    assert cluster_spec["rayVersion"] == ray.__version__
    assert cluster_spec["enableInTreeAutoscaling"] is True and cluster_spec["autoscalerOptions"]
    head = cluster_spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (gpu,) = cluster_spec["workerGroupSpecs"]
    container = gpu["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 8000}
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports["serve"] == 8000 and ports["serve-grpc"] == 9000
    engine = next(d for d in yaml.safe_load(spec["serveConfigV2"])["applications"][0]["deployments"]
                  if d["name"] == "HiSpecEngine")
    scaling = engine["autoscaling_config"]
    # one pipeline per pod; one spare pod so that a rollout at full scale starts a new pipeline first
    assert engine["max_surge_percent"] > 0
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (scaling["min_replicas"], scaling["max_replicas"] + 1)


def test_image_and_ray_versions_agree():
    version = ray.__version__
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(version)}-py311-gpu$", dockerfile, re.M)
    assert "hispec/models/*/" in (ROOT / "cluster" / "Dockerfile.dockerignore").read_text()  # no weights in images
    config = yaml.safe_load((ROOT / "ray_config.yaml").read_text())
    assert config["docker"]["image"] == f"rayproject/ray:{version}-py311-gpu"


# --- the CRD schema and KubeRay's rules refuse broken copies ------------------------------------------

def _worker(doc):
    return doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]


def _head(doc):
    return doc["spec"]["rayClusterConfig"]["headGroupSpec"]


@pytest.mark.parametrize("break_it, expected", [
    (lambda d: _worker(d).pop("groupName"), "workerGroupSpecs[0]: 'groupName' is a required property"),
    (lambda d: _worker(d).update(replicas="2"), "workerGroupSpecs[0].replicas: '2' is not of type 'integer'"),
    (lambda d: _head(d)["rayStartParams"].update({"num-cpus": 0}), "num-cpus: 0 is not of type 'string'"),
    (lambda d: d["spec"]["rayClusterConfig"].update(workerGroupSpec=[]), "'workerGroupSpec' was unexpected"),
    (lambda d: _worker(d)["template"]["spec"]["containers"][0].update(readinessProbes={}), "'readinessProbes' was unexpected"),
    (lambda d: _worker(d)["template"]["spec"]["containers"][0]["resources"]["limits"].update(cpu=0.5),
     "limits.cpu: 0.5 is not valid under any of the given schemas"),
    (lambda d: _worker(d)["template"]["spec"]["containers"][0]["resources"]["limits"].update(memory="lots"),
     "limits.memory: 'lots' does not match"),
    (lambda d: d["spec"]["rayClusterConfig"]["autoscalerOptions"].update(version="v3"), "'v3' is not one of"),
    (lambda d: d["spec"].update(serveConfigV2={"applications": []}), "serveConfigV2: {'applications': []} is not of type 'string'"),
])
def test_crd_schema_refuses(schema, manifest, break_it, expected):
    assert cluster.schema_errors(manifest, schema) == []
    break_it(manifest)
    assert any(expected in e for e in cluster.schema_errors(manifest, schema)), cluster.schema_errors(manifest, schema)


@pytest.mark.parametrize("break_it, expected", [
    (lambda d: d["metadata"].update(name="HiSpec"), "DNS-1035"),
    (lambda d: d["metadata"].update(name="h" * 48), "at most 47"),
    (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
    (lambda d: d["spec"]["upgradeStrategy"].update(type="Rolling"), "upgradeStrategy.type: 'Rolling'"),
    (lambda d: _worker(d).update(minReplicas=5), "minReplicas (5)"),
    (lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"].append(copy.deepcopy(_worker(d))), "used twice"),
    (lambda d: _worker(d)["template"]["spec"].update(restartPolicy="Always"), "restartPolicy"),
])
def test_kuberay_rules_refuse(schema, manifest, break_it, expected):
    break_it(manifest)
    errors = errors_of(manifest, schema)
    assert any(expected in e for e in errors), errors


# --- this project's rules: the traps of the issue -------------------------------------------------------

def _engine(config):
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == "HiSpecEngine")


@pytest.mark.parametrize("break_it, expected", [
    # the replica holding the GPU its stages need (it would also not fit bundle 0)
    (lambda c: _engine(c).update(ray_actor_options={"num_cpus": 1, "num_gpus": 1}), "ray_actor_options: would replace"),
    # a pipeline of 3 GPUs cannot be STRICT_PACKed on 2-GPU pods
    (lambda c: c["applications"][0]["args"].update(pipeline_stages=3), "needs one node with 5 CPUs and 3 GPUs"),
    # more pipelines than the worker group can ever hold, or no spare pod for a rollout at full scale
    (lambda c: _engine(c)["autoscaling_config"].update(max_replicas=6), "scales to 6 pipelines (+2 while"),
    (lambda c: _engine(c).update(max_surge_percent=50), "scales to 4 pipelines (+2 while a new config rolls out"),
    # a misspelt Serve field would be ignored by Serve
    (lambda c: _engine(c).update(max_ongoing_request=64), "max_ongoing_request: unknown field"),
    (lambda c: _engine(c)["autoscaling_config"].update(target_ongoing_request=8), "target_ongoing_request: unknown field"),
    (lambda c: _engine(c).update(max_ongoing_requests="many"), "valid integer"),
    # args AppArgs refuses
    (lambda c: c["applications"][0]["args"].update(placement_strategy="STRICT_SPREAD"), "placement_strategy"),
    (lambda c: c["applications"][0]["args"].update(max_batch_siz=8), "max_batch_siz: Extra inputs are not permitted"),
    (lambda c: c["applications"][0]["args"].update(model="/models/not-there"), "no checkpoint"),
    (lambda c: c["applications"][0]["deployments"].append({"name": "HiSpecEngin"}), "'HiSpecEngin' is not a deployment"),
])
def test_serve_config_rules_refuse(schema, manifest, serve_config, break_it, expected):
    break_it(serve_config)
    errors = errors_of(with_serve_config(manifest, serve_config), schema)
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize("break_it, expected", [
    (lambda d: d["spec"]["rayClusterConfig"].update(rayVersion="2.9.0"), "rayVersion: '2.9.0'"),
    (lambda d: _head(d)["template"]["spec"]["containers"][0].update(image="rayproject/ray:latest"), "must name Ray"),
    (lambda d: _head(d)["rayStartParams"].update({"num-cpus": "4"}), "num-cpus: must be \"0\""),
    (lambda d: _worker(d)["template"]["spec"]["containers"][0]["resources"].pop("limits"), "resources.limits.cpu: missing"),
    (lambda d: _worker(d)["template"]["spec"]["containers"][0]["resources"]["requests"].update({"nvidia.com/gpu": "1"}),
     "requests (1) and limits (2) must be equal"),
    (lambda d: d["spec"]["rayClusterConfig"]["autoscalerOptions"].pop("resources"), "autoscalerOptions.resources"),
    (lambda d: d["spec"]["rayClusterConfig"].update(enableInTreeAutoscaling=False), "enableInTreeAutoscaling"),
    (lambda d: _head(d)["template"]["spec"]["containers"][0]["ports"].pop(), "named 'serve-grpc' = 9000"),
    (lambda d: _worker(d)["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"].update(path="/"),
     "readinessProbe must be httpGet /healthz"),
    (lambda d: _head(d)["template"]["spec"]["containers"][0].pop("volumeMounts"), "nothing mounted at /models/"),
    (lambda d: _worker(d)["template"]["spec"]["containers"][0]["volumeMounts"][0].pop("readOnly"), "mounted readOnly"),
    (lambda d: _worker(d)["template"]["spec"]["containers"][0]["resources"]["limits"].update({"nvidia.com/gpu": "1"}),
     "needs one node with 4 CPUs and 2 GPUs"),
])
def test_manifest_rules_refuse(schema, manifest, break_it, expected):
    break_it(manifest)
    errors = errors_of(manifest, schema)
    assert any(expected in e for e in errors), errors


def test_pack_pipelines_fit_by_bundle():
    pipeline = cluster.Pipeline("hispec", [{"CPU": 2}, {"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}], "PACK", 4)
    one_gpu_pods = [cluster.NodeType("head", 0, 0, 1), cluster.NodeType("gpu-1x", 4, 1, 8)]
    assert cluster.fit_errors([pipeline], one_gpu_pods, "x") == []  # PACK may split a pipeline over pods
    strict = cluster.Pipeline("hispec", pipeline.bundles, "STRICT_PACK", 4)
    assert "needs one node" in cluster.fit_errors([strict], one_gpu_pods, "x")[0]
    assert "at most 3" in cluster.fit_errors([pipeline], [cluster.NodeType("gpu-1x", 4, 1, 7)], "x")[0]


# --- ray_config.yaml ------------------------------------------------------------------------------------

@pytest.fixture()
def ray_config() -> dict:
    return yaml.safe_load((ROOT / "ray_config.yaml").read_text())


def test_ray_config_validates(ray_config, serve_config):
    assert cluster.ray_config_errors(ray_config, serve_config, MODEL_ROOT) == []
    nodes = ray_config["available_node_types"]
    assert nodes[ray_config["head_node_type"]]["resources"] == {"CPU": 0}
    assert nodes["gpu_worker"]["resources"]["GPU"] >= 2 and nodes["gpu_worker"]["min_workers"] >= 1
    assert any("pip install" in c and "hispec" in c for c in ray_config["setup_commands"])
    assert any("serve deploy deploy/hispec-gpu.yaml" in c for c in ray_config["head_start_ray_commands"])
    assert ".gitignore" in ray_config["rsync_filter"]  # never upload .venv
    assert ray_config["file_mounts"]["/models/hispec-stdlib-ee"] == "./hispec/models/hispec-stdlib-ee"


@pytest.mark.parametrize("break_it, expected", [
    (lambda c: c.update(max_workers="many"), "max_workers: 'many' is not of type 'integer'"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(max_workers="2"), "'2' is not of type 'integer'"),
    (lambda c: c.update(setup_comands=[]), "'setup_comands' was unexpected"),
    (lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"), "'node_config' is a required property"),
    (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=1.5), "1.5 is not of type 'integer'"),
    (lambda c: c.update(max_workers=0), "smaller than the sum of `min_workers`"),
    (lambda c: c.update(head_node_type="gpu"), "`head_node_type` must be one of"),
    (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=1), "needs one node with"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(max_workers=2), "at most 4"),
])
def test_ray_config_refuses(ray_config, serve_config, break_it, expected):
    break_it(ray_config)
    errors = cluster.ray_config_errors(ray_config, serve_config, MODEL_ROOT)
    assert any(expected in e for e in errors), errors


# --- render and the drift check -----------------------------------------------------------------------

def test_manifest_is_rendered_from_the_deploy_yaml():
    assert cluster.drift(DEPLOY.read_text(), MANIFEST.read_text()) is None
    assert cluster.render(DEPLOY.read_text(), MANIFEST.read_text()) == MANIFEST.read_text()


def test_drift_is_caught_both_ways():
    deploy, manifest = DEPLOY.read_text(), MANIFEST.read_text()
    edited = deploy.replace("max_replicas: 4\n          target_ongoing_requests: 48",
                            "max_replicas: 6\n          target_ongoing_requests: 48")
    assert edited != deploy
    diff = cluster.drift(edited, manifest, "deploy", "manifest")
    assert "-          max_replicas: 6" in diff and "+          max_replicas: 4" in diff
    hand_edited = manifest.replace("          max_batch_size: 64", "          max_batch_size: 32")
    assert hand_edited != manifest and "max_batch_size: 32" in cluster.drift(deploy, hand_edited)
    # a comment is part of the text too: serveConfigV2 is the deploy YAML verbatim
    assert cluster.drift(deploy.replace("# Same API", "# The same API"), manifest) is not None


STALE = """\
# top comment
apiVersion: ray.io/v1
kind: RayService
metadata:
  name: demo   # trailing comment
spec:
  # comment before the block
  serveConfigV2: |
    applications:
      - name: old

    # a stale comment inside
  rayClusterConfig:   # kept
    rayVersion: "1"

# bottom comment
"""


def test_render_replaces_only_the_block():
    deploy = DEPLOY.read_text()
    rendered = cluster.render(deploy, STALE)
    assert cluster.drift(deploy, rendered) is None and cluster.drift(deploy, STALE) is not None
    outside = [line for line in STALE.splitlines() if not line.startswith("    ")]
    for line in outside:
        assert line in rendered.splitlines()
    assert "a stale comment" not in rendered and "name: old" not in rendered
    assert rendered.index("# comment before the block") < rendered.index("serveConfigV2: |") < rendered.index(
        "  rayClusterConfig:   # kept")
    assert cluster.render(deploy, rendered) == rendered  # idempotent
    doc = yaml.safe_load(rendered)
    assert doc["spec"]["rayClusterConfig"] == {"rayVersion": "1"} and doc["metadata"]["name"] == "demo"


@pytest.mark.parametrize("manifest, expected", [
    ("kind: RayService\nspec:\n  serveConfigV2: 'applications: []'\n", "plain literal block"),
    ("kind: RayService\nspec:\n  serveConfigV2: |-\n    a: 1\n", "default chomping"),
    ("kind: RayService\nspec:\n  rayClusterConfig: {}\n", "no `serveConfigV2: |` block"),
    ("kind: RayService\nspec:\n  serveConfigV2: |\n    a: 1\n---\nkind: RayService\nspec:\n  serveConfigV2: |\n    b: 1\n",
     "2 `serveConfigV2: |` blocks"),
])
def test_render_refuses_what_it_cannot_fill(manifest, expected):
    with pytest.raises(cluster.RenderError, match=re.escape(expected)):
        cluster.render("a: 1\n", manifest)


def test_cli_render_and_check(tmp_path, capsys):
    assert SUBCOMMANDS["cluster"][0] == "hispec.cluster"
    deploy, manifest = tmp_path / "deploy.yaml", tmp_path / "rayservice.yaml"
    deploy.write_text(DEPLOY.read_text().replace("max_batch_size: 64", "max_batch_size: 48"))
    manifest.write_text(MANIFEST.read_text())
    check = ["render", "--deploy", str(deploy), "--manifest", str(manifest), "--check"]
    assert cluster.main(check) == 1
    assert "max_batch_size: 48" in capsys.readouterr().err
    assert manifest.read_text() == MANIFEST.read_text()  # --check writes nothing
    assert cluster.main(check[:-1]) == 0
    assert cluster.main(check) == 0
    assert "max_batch_size: 48" in yaml.safe_load(manifest.read_text())["spec"]["serveConfigV2"]
    assert manifest.read_text().splitlines()[:20] == MANIFEST.read_text().splitlines()[:20]  # head comments kept


def test_cli_validate_the_repository(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(ROOT)
    assert cluster.main(["validate"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "cluster/rayservice.yaml: ok" in out and "ray_config.yaml: ok" in out
    broken = tmp_path / "broken.yaml"
    broken.write_text(MANIFEST.read_text().replace("        replicas: 1\n", "        replicas: one\n"))
    assert cluster.main(["validate", str(broken)]) == 1
    assert "replicas: 'one' is not of type 'integer'" in capsys.readouterr().out
