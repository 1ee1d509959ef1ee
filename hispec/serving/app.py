"""`build_app(args)`: the application `deploy/hispec.yaml` imports (`hispec.serving.app:build_app`)."""

from __future__ import annotations

from ray.serve import Application

from hispec.serving.config import AppArgs
from hispec.serving.engine_deployment import HiSpecEngine
from hispec.serving.ingress import HiSpecIngress


def build_app(args: dict) -> Application:
    """Validates `args` (see AppArgs) once, here, and wires ingress -> engine."""
    app_args = AppArgs.model_validate(args or {})
    validated = app_args.model_dump(mode="json")
    engine = HiSpecEngine
    bundles = app_args.placement_bundles()
    if bundles is not None:  # one replica = one pipeline: it reserves its stages' bundles with itself
        engine = HiSpecEngine.options(placement_group_bundles=bundles,
                                      placement_group_strategy=app_args.placement_strategy,
                                      ray_actor_options={"num_cpus": app_args.replica_cpus})
    return HiSpecIngress.bind(engine.bind(validated), validated)
