"""The pipelines a Serve config reserves (each hispec application built, its placement bundles read)
and whether they fit the nodes: the RayService's worker groups or ray_config.yaml's node types."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from hispec.cluster.serve_config import _pydantic_lines, local_model_args


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
