"""`hispec cluster`: the KubeRay RayService (cluster/rayservice.yaml) and the cluster-launcher config
(ray_config.yaml), kept in step with the Serve config they deploy and checked offline.

One module per job:

    rendering     the deploy YAML -> the manifest's serveConfigV2 (render, drift)
    crd           the RayService CRD schema (closed to unknown fields) and KubeRay's own rules
    serve_config  the Serve config: Ray Serve's schema, unknown fields refused; model paths mapped locally
    fit           the pipelines a Serve config reserves, and whether they fit the nodes
    manifest      the RayService manifest: this project's rules, and everything validate checks on one
    launcher      ray_config.yaml (the cluster launcher)
    cli           the command: `hispec cluster render|validate` (main)
"""

from hispec.cluster.cli import DEFAULT_DEPLOY, DEFAULT_MANIFEST, DEFAULT_RAY_CONFIG, main
from hispec.cluster.crd import (
    DEFAULT_SCHEMA,
    DNS1035,
    GPU_RESOURCE,
    MAX_RAYSERVICE_NAME,
    UPGRADE_TYPES,
    closed,
    kuberay_rule_errors,
    load_schema,
    schema_errors,
)
from hispec.cluster.fit import NodeType, Pipeline, app_errors, fit_errors
from hispec.cluster.launcher import ray_config_errors
from hispec.cluster.manifest import manifest_errors, manifest_rule_errors, node_types_of, quantity
from hispec.cluster.rendering import RenderError, canonical, drift, render, served_config_text
from hispec.cluster.serve_config import MODEL_ROOT, local_model_args, serve_config_errors

__all__ = [
    "DEFAULT_DEPLOY", "DEFAULT_MANIFEST", "DEFAULT_RAY_CONFIG", "DEFAULT_SCHEMA", "DNS1035", "GPU_RESOURCE",
    "MAX_RAYSERVICE_NAME", "MODEL_ROOT", "UPGRADE_TYPES", "NodeType", "Pipeline", "RenderError", "app_errors",
    "canonical", "closed", "drift", "fit_errors", "kuberay_rule_errors", "load_schema", "local_model_args", "main",
    "manifest_errors", "manifest_rule_errors", "node_types_of", "quantity", "ray_config_errors", "render",
    "schema_errors", "serve_config_errors", "served_config_text",
]
