"""The RayService CRD schema (the OpenAPI schema `kubectl apply` checks against, closed to unknown
fields) and KubeRay's own rules beyond it."""

from __future__ import annotations

import copy
import re
from pathlib import Path

DEFAULT_SCHEMA = Path("cluster/schemas/rayservice.v1.schema.json")

# KubeRay's limits and enums (ray-operator/controllers/ray/utils: validation.go, constant.go)
MAX_RAYSERVICE_NAME = 47  # 53 (RayCluster) minus the 6 characters KubeRay appends to name the cluster
UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
GPU_RESOURCE = "nvidia.com/gpu"


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
