"""`build_app(args)`: the application `deploy/hispec.yaml` imports (`hispec.serving.app:build_app`)."""

from __future__ import annotations

from ray.serve import Application

from hispec.serving.config import AppArgs
from hispec.serving.engine_deployment import HiSpecEngine
from hispec.serving.ingress import HiSpecIngress


def build_app(args: dict) -> Application:
    """Validates `args` (see AppArgs) once, here, and wires ingress -> engine."""
    validated = AppArgs.model_validate(args or {}).model_dump(mode="json")
    return HiSpecIngress.bind(HiSpecEngine.bind(validated), validated)
