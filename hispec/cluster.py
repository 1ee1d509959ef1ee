"""`hispec cluster`: the KubeRay RayService (cluster/rayservice.yaml) and the cluster-launcher config
(ray_config.yaml), kept in step with the Serve config they deploy and checked offline.

    hispec cluster render   [--deploy deploy/hispec-gpu.yaml] [--manifest cluster/rayservice.yaml] [--check]
    hispec cluster validate [--deploy ...] [--schema cluster/schemas/rayservice.v1.schema.json]
                            [--ray-config ray_config.yaml] [--model-root /models=DIR] [MANIFEST ...]

`render` copies the deploy YAML, verbatim, into the manifest's `serveConfigV2: |` literal block and
leaves every other line of the manifest (comments included) as it was; `--check` writes nothing and
exits 1 when the two differ. `validate` checks each manifest against the RayService CRD's OpenAPI
schema (unknown fields refused, as `kubectl apply` does) and KubeRay's own rules, its serveConfigV2
against Ray Serve's schema (unknown fields refused too: Serve itself ignores them) and by building the
application, the cluster rules of this project (resources, ports, model volume, Ray version, pipelines
that fit the worker nodes), and ray_config.yaml against Ray's cluster-launcher schema. Paths are
relative to the current directory (the repository root).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import math
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

DEFAULT_DEPLOY = Path("deploy/hispec-gpu.yaml")
DEFAULT_MANIFEST = Path("cluster/rayservice.yaml")
DEFAULT_SCHEMA = Path("cluster/schemas/rayservice.v1.schema.json")
DEFAULT_RAY_CONFIG = Path("ray_config.yaml")
MODEL_ROOT = "/models"  # where the model volume is mounted in every pod / node

# KubeRay's limits and enums (ray-operator/controllers/ray/utils: validation.go, constant.go)
MAX_RAYSERVICE_NAME = 47  # 53 (RayCluster) minus the 6 characters KubeRay appends to name the cluster
UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
GPU_RESOURCE = "nvidia.com/gpu"


class RenderError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------
# render: the deploy YAML -> serveConfigV2
# ---------------------------------------------------------------------------------------------------

_BLOCK_HEADER = re.compile(r"^(?P<indent> *)serveConfigV2: *\|(?P<chomp>[-+]?) *(#.*)?$")
_ANY_HEADER = re.compile(r"^ *serveConfigV2:")


def canonical(text: str) -> str:
    """What the literal block holds for `text`: each line without trailing whitespace, no trailing
    blank lines, one final newline (YAML's default "clip" chomping)."""
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


def _block_span(lines: list[str]) -> tuple[int, int, int]:
    """(header line, end of the block's content, the header's indentation)."""
    headers = [i for i, line in enumerate(lines) if _BLOCK_HEADER.match(line)]
    if not headers:
        if any(_ANY_HEADER.match(line) for line in lines):
            raise RenderError("serveConfigV2 must be a plain literal block (`serveConfigV2: |`) for render to fill it")
        raise RenderError("the manifest has no `serveConfigV2: |` block")
    if len(headers) > 1:
        raise RenderError(f"the manifest has {len(headers)} `serveConfigV2: |` blocks; render fills exactly one")
    start = headers[0]
    if _BLOCK_HEADER.match(lines[start]).group("chomp"):
        raise RenderError("serveConfigV2 must use the default chomping (`|`, not `|-` or `|+`)")
    indent = len(_BLOCK_HEADER.match(lines[start]).group("indent"))
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip(" ")) > indent):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # blank lines after the block stay outside it
        end -= 1
    return start, end, indent


def _load_all(text: str) -> list:
    return [doc for doc in yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if doc]


def served_config_text(manifest_text: str) -> str:
    """The serveConfigV2 string of the manifest's one RayService."""
    found = [doc["spec"]["serveConfigV2"] for doc in _load_all(manifest_text)
             if isinstance(doc, dict) and doc.get("kind") == "RayService"
             and isinstance(doc.get("spec"), dict) and "serveConfigV2" in doc["spec"]]
    if len(found) != 1:
        raise RenderError(f"expected one RayService with spec.serveConfigV2, found {len(found)}")
    if not isinstance(found[0], str):
        raise RenderError("spec.serveConfigV2 must be a string (the Serve config as YAML text)")
    return found[0]


def render(deploy_text: str, manifest_text: str) -> str:
    """The manifest with its serveConfigV2 block replaced by `deploy_text` (all other lines unchanged)."""
    body = canonical(deploy_text)
    first = next((line for line in body.splitlines() if line.strip()), "")
    if first[:1].isspace():
        raise RenderError("the deploy YAML's first line must not be indented "
                          "(YAML would take it for the block's indentation)")
    lines = manifest_text.splitlines()
    start, end, indent = _block_span(lines)
    pad = " " * (indent + 2)
    block = [pad + line if line else "" for line in body.splitlines()]
    rendered = "\n".join(lines[: start + 1] + block + lines[end:]) + "\n"
    if canonical(served_config_text(rendered)) != body:  # never write a manifest that does not say what we meant
        raise RenderError("the rendered serveConfigV2 does not read back as the deploy YAML")
    return rendered


def drift(deploy_text: str, manifest_text: str, deploy_name: str = "deploy",
          manifest_name: str = "manifest") -> str | None:
    """A unified diff (deploy YAML -> the manifest's serveConfigV2) when they differ, else None."""
    want, have = canonical(deploy_text), canonical(served_config_text(manifest_text))
    if want == have:
        return None
    return "".join(difflib.unified_diff(want.splitlines(True), have.splitlines(True),
                                        f"{deploy_name}", f"{manifest_name}: spec.serveConfigV2"))


# ---------------------------------------------------------------------------------------------------
# the RayService CRD schema
# ---------------------------------------------------------------------------------------------------

def load_schema(path: Path = DEFAULT_SCHEMA) -> dict:
    import json

    return json.loads(Path(path).read_text())


def closed(schema: dict) -> dict:
    """A copy where every object schema that lists its properties refuses others (what the API server
    does with unknown fields under `kubectl apply`'s default strict field validation); maps
    (`additionalProperties`), free objects (no `properties`) and `x-kubernetes-preserve-unknown-fields`
    stay open."""
    def close(node):
        if isinstance(node, dict):
            node = {key: close(value) for key, value in node.items()}
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            return node
        if isinstance(node, list):
            return [close(item) for item in node]
        return node

    return close(copy.deepcopy(schema))


def _path(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top)"


_validators: dict[int, object] = {}


def schema_errors(doc, schema: dict) -> list[str]:
    from jsonschema import Draft7Validator

    validator = _validators.get(id(schema))
    if validator is None:
        validator = _validators[id(schema)] = Draft7Validator(closed(schema))
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{_path(e.absolute_path)}: {e.message}" for e in errors]


def kuberay_rule_errors(doc: dict) -> list[str]:
    """KubeRay's own checks of a RayService beyond the schema (validation.go), for what we use."""
    errors = []
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion: {doc.get('apiVersion')!r}, expected 'ray.io/v1'")
    name = (doc.get("metadata") or {}).get("name", "")
    if not isinstance(name, str) or not DNS1035.match(name) or len(name) > MAX_RAYSERVICE_NAME:
        errors.append(f"metadata.name: {name!r} must be a DNS-1035 label of at most {MAX_RAYSERVICE_NAME} characters")
    spec = doc.get("spec") or {}
    upgrade = (spec.get("upgradeStrategy") or {}).get("type")
    if upgrade is not None and upgrade not in UPGRADE_TYPES:
        errors.append(f"spec.upgradeStrategy.type: {upgrade!r} is not one of {', '.join(UPGRADE_TYPES)}")
    cluster = spec.get("rayClusterConfig") or {}
    groups = [("headGroupSpec", cluster.get("headGroupSpec") or {})]
    groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(cluster.get("workerGroupSpecs") or [])]
    names = [g.get("groupName") for _, g in groups[1:]]
    for dup in sorted({n for n in names if names.count(n) > 1 and n is not None}):
        errors.append(f"workerGroupSpecs: groupName {dup!r} is used twice")
    v2 = (cluster.get("autoscalerOptions") or {}).get("version") == "v2"
    for where, group in groups:
        where = f"spec.rayClusterConfig.{where}"
        if not ((group.get("template") or {}).get("spec") or {}).get("containers"):
            errors.append(f"{where}.template.spec.containers: at least one container (the Ray container first)")
        params = group.get("rayStartParams") or {}
        if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errors.append(f"{where}: resources and rayStartParams resources are both set; use one")
        if "labels" in params:
            errors.append(f"{where}.rayStartParams.labels: not supported; use the group's labels field")
        restart = ((group.get("template") or {}).get("spec") or {}).get("restartPolicy")
        if cluster.get("enableInTreeAutoscaling") and v2 and restart not in (None, "", "Never"):
            errors.append(f"{where}.template.spec.restartPolicy: must be Never or unset with autoscaler v2")
        if where.endswith("]") and all(isinstance(group.get(k), int) for k in ("minReplicas", "maxReplicas")):
            low, high = group["minReplicas"], group["maxReplicas"]
            replicas = group.get("replicas", low)
            if not (0 <= low <= high) or (isinstance(replicas, int) and not low <= replicas <= high):
                errors.append(f"{where}: needs 0 <= minReplicas ({low}) <= replicas ({replicas}) "
                              f"<= maxReplicas ({high})")
    return errors


# ---------------------------------------------------------------------------------------------------
# the Serve config
# ---------------------------------------------------------------------------------------------------

def _models_in(annotation) -> list[type]:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, typing.Annotated) or origin is getattr(typing, "List", None):
        args = typing.get_args(annotation)[:1] if origin is typing.Annotated else typing.get_args(annotation)
        return [model for arg in args for model in _models_in(arg)]
    return []


def _unknown_fields(model: type, data, where: str) -> list[str]:
    if not isinstance(data, dict):
        return []
    fields = {}
    for name, field in model.model_fields.items():
        fields[name] = field
        if field.alias:
            fields[field.alias] = field
    errors = []
    for key, value in data.items():
        if key not in fields:
            errors.append(f"{where}{key}: unknown field (Serve would ignore it)")
            continue
        models = _models_in(fields[key].annotation)
        if len(models) != 1:
            continue
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            sub = f"{where}{key}[{i}]." if isinstance(value, list) else f"{where}{key}."
            errors += _unknown_fields(models[0], item, sub)
    return errors


def serve_config_errors(config) -> list[str]:
    """Ray Serve's own schema (ServeDeploySchema), plus: no field Serve does not know (it would
    silently ignore a misspelt one)."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    if not isinstance(config, dict):
        return ["the Serve config must be a mapping"]
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as error:
        return _pydantic_lines(error)
    return _unknown_fields(ServeDeploySchema, config, "")


def local_model_args(args: dict, model_root: tuple[str, Path]) -> dict:
    """`args` with a model path under the cluster's model root (e.g. /models/x) mapped to the local
    directory that mirrors it (default: the bundled models, hispec/models/x)."""
    remote, local = model_root
    args = dict(args or {})
    model = str(args.get("model", ""))
    if model == remote or model.startswith(remote.rstrip("/") + "/"):
        args["model"] = str(Path(local) / model[len(remote.rstrip("/")):].lstrip("/"))
    return args


def _pydantic_lines(error: Exception) -> list[str]:
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return [f"{'.'.join(map(str, e['loc'])) or '(args)'}: {e['msg']}" for e in error.errors()]
    return [str(error)]


@dataclass(frozen=True)
class Pipeline:
    app: str
    bundles: list  # [{"CPU": x, "GPU": y}, ...]: bundle 0 the replica's, then one per stage
    strategy: str
    max_replicas: int
    surge: int = 0  # extra pipelines while a new config rolls out (the deployment's max_surge_percent)


@dataclass(frozen=True)
class NodeType:
    name: str
    cpus: float
    gpus: float
    max_count: int


def app_errors(config: dict, model_root: tuple[str, Path]) -> tuple[list[str], list[Pipeline]]:
    """Builds every hispec application of a (schema-valid) Serve config; returns the errors and the
    pipelines its engine deployments reserve."""
    from hispec.serving.app import build_app
    from hispec.serving.config import AppArgs

    errors, pipelines = [], []
    for a, app in enumerate(config.get("applications") or []):
        where = f"applications[{a}]"
        if app.get("import_path") != "hispec.serving.app:build_app":
            continue
        args = local_model_args(app.get("args") or {}, model_root)
        try:
            build_app(args)
            app_args = AppArgs.model_validate(args)
        except Exception as error:  # noqa: BLE001 - reported, with the field pydantic names
            mapped = (app.get("args") or {}).get("model") != args.get("model")
            note = f" (args.model {app['args']['model']} read as {args['model']}: see --model-root)" if mapped else ""
            errors += [f"{where}.args: {e}" + (note if e.startswith("model:") else "") for e in _pydantic_lines(error)]
            continue
        deployments = {d.get("name"): d for d in app.get("deployments") or []}
        for name in sorted(set(deployments) - {"HiSpecEngine", "HiSpecIngress"}):
            errors.append(f"{where}.deployments: {name!r} is not a deployment of this application "
                          "(HiSpecEngine, HiSpecIngress)")
        engine = deployments.get("HiSpecEngine", {})
        bundles = app_args.placement_bundles()
        if bundles is None:
            continue
        for key in ("ray_actor_options", "placement_group_bundles", "placement_group_strategy"):
            if key in engine:
                errors.append(f"{where}.deployments[HiSpecEngine].{key}: would replace what build_app reserves "
                              "for the pipeline (bundle 0, CPU only, for the replica; one bundle per stage); "
                              "size it with args (replica_cpus, stage_cpus, stage_gpus, placement_strategy)")
        if bundles[0].get("GPU"):
            errors.append(f"{where}: bundle 0 (the replica) holds a GPU its stages need")
        scaling = engine.get("autoscaling_config") or {}
        replicas = scaling.get("max_replicas") or engine.get("num_replicas") or 1
        replicas = replicas if isinstance(replicas, int) else 1
        surge = math.ceil(replicas * engine.get("max_surge_percent", 0) / 100)
        pipelines.append(Pipeline(app.get("name", where), bundles, app_args.placement_strategy, replicas, surge))
    return errors, pipelines


def fit_errors(pipelines: list[Pipeline], nodes: list[NodeType], where: str) -> list[str]:
    """Each pipeline must be placeable on the nodes, and the nodes at their maximum must hold the
    engine's max_replicas pipelines, plus its surge during a rollout (else autoscaling, or a rollout
    at full scale, stalls with pending placement groups)."""
    errors = []
    for p in pipelines:
        need_cpu = sum(b.get("CPU", 0) for b in p.bundles)
        need_gpu = sum(b.get("GPU", 0) for b in p.bundles)
        if p.strategy == "STRICT_PACK":
            per_node = {n.name: min(math.floor(n.cpus / need_cpu + 1e-9) if need_cpu else math.inf,
                                    math.floor(n.gpus / need_gpu + 1e-9) if need_gpu else math.inf) for n in nodes}
            if not any(per_node.values()):
                errors.append(f"{where}: a pipeline of {p.app} needs one node with {need_cpu:g} CPUs and "
                              f"{need_gpu:g} GPUs (STRICT_PACK); the largest offer "
                              + ", ".join(f"{n.name} {n.cpus:g} CPU / {n.gpus:g} GPU" for n in nodes))
                continue
            capacity = sum(n.max_count * per_node[n.name] for n in nodes)
        else:
            for i, bundle in enumerate(p.bundles):
                if not any(n.cpus >= bundle.get("CPU", 0) and n.gpus >= bundle.get("GPU", 0) for n in nodes):
                    errors.append(f"{where}: bundle {i} of {p.app} ({bundle}) fits no node")
            capacity = math.floor(sum(n.max_count * n.gpus for n in nodes) / need_gpu) if need_gpu else math.inf
        if capacity < p.max_replicas + p.surge:
            surge = f" (+{p.surge} while a new config rolls out: max_surge_percent)" if p.surge else ""
            errors.append(f"{where}: {p.app} scales to {p.max_replicas} pipelines{surge} but the nodes hold at most "
                          f"{capacity} at their maximum counts")
    return errors


# ---------------------------------------------------------------------------------------------------
# the RayService manifest
# ---------------------------------------------------------------------------------------------------

def quantity(value) -> float:
    """A Kubernetes quantity as a number (CPU cores, GPUs): 8, "8", "500m", "1.5"."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _groups(spec: dict) -> list[tuple[str, dict]]:
    cluster = spec.get("rayClusterConfig") or {}
    return [("headGroupSpec", cluster.get("headGroupSpec") or {})] + [
        (f"workerGroupSpecs[{i}]", g) for i, g in enumerate(cluster.get("workerGroupSpecs") or [])]


def _ray_container(group: dict) -> dict:
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    return containers[0]


def node_types_of(spec: dict) -> list[NodeType]:
    """What Ray sees per pod: rayStartParams num-cpus / num-gpus when set, else the Ray container's
    limits (as KubeRay passes them to `ray start`)."""
    nodes = []
    for where, group in _groups(spec):
        params = group.get("rayStartParams") or {}
        limits = (_ray_container(group).get("resources") or {}).get("limits") or {}
        cpus = quantity(params.get("num-cpus", limits.get("cpu", 0)))
        gpus = quantity(params.get("num-gpus", limits.get(GPU_RESOURCE, 0)))
        count = 1 if where == "headGroupSpec" else int(group.get("maxReplicas", 0)) * int(group.get("numOfHosts", 1))
        name = "head" if where == "headGroupSpec" else group.get("groupName", where)
        nodes.append(NodeType(name, cpus, gpus, count))
    return nodes


def manifest_rule_errors(doc: dict, serve_config: dict, ray_version: str) -> list[str]:
    """This project's rules for its RayService: the head takes no Ray work, requests and limits on
    every container, the serve ports named for KubeRay's serve service, the model volume mounted
    read-only wherever the application may read it, readiness from /healthz, and Ray's version."""
    errors = []
    spec = doc.get("spec") or {}
    cluster = spec.get("rayClusterConfig") or {}
    if cluster.get("rayVersion") != ray_version:
        errors.append(f"spec.rayClusterConfig.rayVersion: {cluster.get('rayVersion')!r}, "
                      f"but this package runs Ray {ray_version}")
    if not cluster.get("enableInTreeAutoscaling"):
        errors.append("spec.rayClusterConfig.enableInTreeAutoscaling: must be true (Serve autoscaling adds pipelines, "
                      "the autoscaler adds the pods for them)")
    options = cluster.get("autoscalerOptions") or {}
    resources = options.get("resources") or {}
    for kind in ("requests", "limits"):
        for name in ("cpu", "memory"):
            if name not in (resources.get(kind) or {}):
                errors.append(f"spec.rayClusterConfig.autoscalerOptions.resources.{kind}.{name}: missing")
    http = (serve_config.get("http_options") or {}).get("port", 8000)
    grpc = (serve_config.get("grpc_options") or {}).get("port")
    model_paths = {str(app.get("args", {}).get("model")) for app in serve_config.get("applications") or []
                   if (app.get("args") or {}).get("model")}
    for where, group in _groups(spec):
        where = f"spec.rayClusterConfig.{where}"
        pod = (group.get("template") or {}).get("spec") or {}
        for c, container in enumerate(pod.get("containers") or []):
            cwhere = f"{where}.template.spec.containers[{c}]"
            res = container.get("resources") or {}
            for kind in ("requests", "limits"):
                for name in ("cpu", "memory"):
                    if name not in (res.get(kind) or {}):
                        errors.append(f"{cwhere}.resources.{kind}.{name}: missing")
            gpu_req = (res.get("requests") or {}).get(GPU_RESOURCE)
            gpu_lim = (res.get("limits") or {}).get(GPU_RESOURCE)
            if (gpu_req or gpu_lim) and str(gpu_req) != str(gpu_lim):
                errors.append(f"{cwhere}.resources: {GPU_RESOURCE} requests ({gpu_req}) and limits ({gpu_lim}) "
                              "must be equal")
            image = str(container.get("image", ""))
            if c == 0 and ray_version not in image.rpartition(":")[2]:
                errors.append(f"{cwhere}.image: {image!r}: its tag must name Ray {ray_version} (rayVersion)")
        ray = _ray_container(group)
        if where.endswith("headGroupSpec"):
            if str((group.get("rayStartParams") or {}).get("num-cpus")) != "0":
                errors.append(f"{where}.rayStartParams.num-cpus: must be \"0\": the head runs the GCS, the Serve "
                              "controller and a proxy, and takes no replicas or stages")
            if quantity(((ray.get("resources") or {}).get("limits") or {}).get(GPU_RESOURCE, 0)):
                errors.append(f"{where}: the head must not request GPUs")
            ports = {p.get("name"): p.get("containerPort") for p in ray.get("ports") or []}
            if ports.get("serve") != http:
                errors.append(f"{where}: the Ray container needs a port named 'serve' = {http} (http_options.port), "
                              "which KubeRay puts on the serve service")
            if grpc is not None and ports.get("serve-grpc") != grpc:
                errors.append(f"{where}: the Ray container needs a port named 'serve-grpc' = {grpc} "
                              "(grpc_options.port); "
                              "KubeRay puts ports named serve-* on the serve service")
        else:
            probe = (ray.get("readinessProbe") or {}).get("httpGet") or {}
            if probe.get("path") != "/healthz" or probe.get("port") not in (http, "serve"):
                errors.append(f"{where}: the Ray container's readinessProbe must be httpGet /healthz on port {http}")
        mounts = {m.get("mountPath"): m for m in ray.get("volumeMounts") or []}
        volumes = {v.get("name"): v for v in pod.get("volumes") or []}
        for model in sorted(model_paths):
            mount = next((m for path, m in mounts.items()
                          if path and (model == path or model.startswith(path.rstrip("/") + "/"))), None)
            if mount is None:
                errors.append(f"{where}: nothing mounted at {model} (args.model); the build task, the ingress "
                              "(tokenizer) and the stages read it on any node")
                continue
            volume = volumes.get(mount.get("name")) or {}
            claim = volume.get("persistentVolumeClaim")
            if not mount.get("readOnly") or not claim or not claim.get("readOnly"):
                errors.append(f"{where}: the model volume {mount.get('name')!r} must be a persistentVolumeClaim "
                              "mounted readOnly (checkpoints come from the volume, replicas never write it)")
    return errors


def manifest_errors(doc, schema: dict, model_root: tuple[str, Path], ray_version: str) -> list[str]:
    """Everything `hispec cluster validate` checks on one RayService document."""
    if not isinstance(doc, dict):
        return ["the manifest must be a mapping"]
    errors = schema_errors(doc, schema) + kuberay_rule_errors(doc)
    text = (doc.get("spec") or {}).get("serveConfigV2")
    if not isinstance(text, str):
        return errors + ["spec.serveConfigV2: missing (the Serve config as a YAML string)"]
    try:
        serve_config = yaml.safe_load(text)
    except yaml.YAMLError as error:
        return errors + [f"spec.serveConfigV2: not YAML: {error}"]
    serve = serve_config_errors(serve_config)
    errors += [f"spec.serveConfigV2: {e}" for e in serve]
    if serve:
        return errors
    built, pipelines = app_errors(serve_config, model_root)
    errors += [f"spec.serveConfigV2: {e}" for e in built]
    errors += manifest_rule_errors(doc, serve_config, ray_version)
    try:
        nodes = node_types_of(doc.get("spec") or {})
    except (TypeError, ValueError) as error:
        return errors + [f"spec.rayClusterConfig: cannot read the node sizes: {error}"]
    return errors + fit_errors(pipelines, nodes, "spec.rayClusterConfig")


# ---------------------------------------------------------------------------------------------------
# ray_config.yaml (the cluster launcher)
# ---------------------------------------------------------------------------------------------------

def ray_config_errors(config, serve_config: dict | None = None,
                      model_root: tuple[str, Path] | None = None) -> list[str]:
    """Ray's cluster-launcher checks as `ray up` runs them (defaults filled in for the provider, then
    ray-schema.json and the launcher's own rules), then, with `serve_config`, whether its pipelines
    fit the node types."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    if not isinstance(config, dict):
        return ["the cluster config must be a mapping"]
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except jsonschema.ValidationError as error:
        return [f"{_path(error.absolute_path)}: {error.message}"]
    except (ValueError, KeyError, TypeError, RuntimeError, AssertionError) as error:
        return [f"{type(error).__name__}: {error}"]
    if serve_config is None:
        return []
    _, pipelines = app_errors(serve_config, model_root or (MODEL_ROOT, _bundled_models()))
    nodes = []
    for name, node in (config.get("available_node_types") or {}).items():
        res = node.get("resources") or {}
        if pipelines and name != config.get("head_node_type") and not {"CPU", "GPU"} <= set(res):
            return [f"available_node_types.{name}.resources: give CPU and GPU explicitly, so that the pipelines' "
                    "bundles can be checked against them (the autoscaler plans with these numbers)"]
        count = 1 if name == config.get("head_node_type") else node.get("max_workers", config.get("max_workers", 0))
        nodes.append(NodeType(name, res.get("CPU", 0), res.get("GPU", 0), count))
    return fit_errors(pipelines, nodes, "available_node_types")


# ---------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------

def _bundled_models() -> Path:
    from hispec.models import DEFAULT_MODEL

    return Path(DEFAULT_MODEL).parent


def _model_root(text: str | None) -> tuple[str, Path]:
    if not text:
        return MODEL_ROOT, _bundled_models()
    remote, sep, local = text.partition("=")
    if not sep or not remote.startswith("/"):
        raise argparse.ArgumentTypeError("--model-root takes /CLUSTER/PATH=LOCAL_DIR")
    return remote, Path(local)


def _render_main(args) -> int:
    deploy_text = args.deploy.read_text()
    manifest_text = args.manifest.read_text()
    try:
        if args.check:
            diff = drift(deploy_text, manifest_text, str(args.deploy), str(args.manifest))
            if diff is None:
                print(f"{args.manifest}: serveConfigV2 matches {args.deploy}")
                return 0
            print(f"{args.manifest}: serveConfigV2 differs from {args.deploy}; run "
                  f"`hispec cluster render --deploy {args.deploy} --manifest {args.manifest}`\n{diff}", file=sys.stderr)
            return 1
        rendered = render(deploy_text, manifest_text)
    except RenderError as error:
        print(f"{args.manifest}: {error}", file=sys.stderr)
        return 2
    if rendered == manifest_text:
        print(f"{args.manifest}: already up to date")
    else:
        args.manifest.write_text(rendered)
        print(f"{args.manifest}: serveConfigV2 rendered from {args.deploy}")
    return 0


def _validate_main(args) -> int:
    import ray

    model_root = _model_root(args.model_root)
    manifests = args.manifests or sorted(Path("cluster").glob("*.yaml"))
    schema = load_schema(args.schema)
    deploy_text = args.deploy.read_text()
    failed = False

    def report(name, errors):
        nonlocal failed
        failed |= bool(errors)
        print(f"{name}: " + ("ok" if not errors else f"{len(errors)} problem(s)"))
        for error in errors:
            print(f"  - {error}")

    for path in manifests:
        text = Path(path).read_text()
        docs = _load_all(text)
        errors = []
        for doc in docs:
            kind = doc.get("kind") if isinstance(doc, dict) else None
            if kind != "RayService":
                errors.append(f"kind {kind!r}: no schema here for it (cluster/ holds RayService manifests)")
                continue
            errors += manifest_errors(doc, schema, model_root, ray.__version__)
        try:
            diff = drift(deploy_text, text, str(args.deploy), str(path))
        except RenderError as error:
            diff = str(error)
        if diff:
            errors.append(f"serveConfigV2 differs from {args.deploy} (run `hispec cluster render`):\n{diff}")
        report(path, errors)
    if args.ray_config and Path(args.ray_config).exists():
        serve_config = yaml.safe_load(deploy_text)
        report(args.ray_config, ray_config_errors(yaml.safe_load(Path(args.ray_config).read_text()), serve_config,
                                                  model_root))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hispec cluster", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    render_cmd = commands.add_parser("render", help="copy the deploy YAML into the RayService's serveConfigV2")
    render_cmd.add_argument("--deploy", type=Path, default=DEFAULT_DEPLOY, help="the Serve config (%(default)s)")
    render_cmd.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="the RayService (%(default)s)")
    render_cmd.add_argument("--check", action="store_true", help="write nothing; exit 1 when they differ")
    check = commands.add_parser("validate", help="check the manifests and ray_config.yaml offline")
    check.add_argument("manifests", nargs="*", type=Path, help="RayService manifests (default: cluster/*.yaml)")
    check.add_argument("--deploy", type=Path, default=DEFAULT_DEPLOY, help="the Serve config (%(default)s)")
    check.add_argument("--schema", type=Path, default=DEFAULT_SCHEMA, help="the RayService schema (%(default)s)")
    check.add_argument("--ray-config", type=Path, default=DEFAULT_RAY_CONFIG, help="launcher config (%(default)s)")
    check.add_argument("--model-root", help=f"CLUSTER=LOCAL: read checkpoints under CLUSTER (default {MODEL_ROOT}) "
                       "from LOCAL (default: the bundled models) to build the application")
    args = parser.parse_args(argv)
    return _render_main(args) if args.command == "render" else _validate_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
