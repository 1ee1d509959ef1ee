"""The RayService manifest: everything `hispec cluster validate` checks on one RayService document
(the CRD schema, KubeRay's rules, serveConfigV2, this project's rules, pipelines that fit the nodes)."""

from __future__ import annotations

import yaml

from hispec.cluster.crd import GPU_RESOURCE, kuberay_rule_errors, schema_errors
from hispec.cluster.fit import NodeType, app_errors, fit_errors
from hispec.cluster.serve_config import serve_config_errors


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
