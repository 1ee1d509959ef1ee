"""ray_config.yaml (the cluster launcher): Ray's own checks as `ray up` runs them, and whether the
Serve config's pipelines fit its node types."""

from __future__ import annotations

import copy
from pathlib import Path

from hispec.cluster.crd import _path
from hispec.cluster.fit import NodeType, app_errors, fit_errors
from hispec.cluster.serve_config import MODEL_ROOT, _bundled_models


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
