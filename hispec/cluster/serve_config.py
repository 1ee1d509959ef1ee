"""The Serve config (serveConfigV2 / deploy/*.yaml): Ray Serve's schema with unknown fields refused,
and the application args' model path mapped from the cluster's model volume to a local copy."""

from __future__ import annotations

import types
import typing
from pathlib import Path

MODEL_ROOT = "/models"  # where the model volume is mounted in every pod / node


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


def _bundled_models() -> Path:
    from hispec.models import DEFAULT_MODEL

    return Path(DEFAULT_MODEL).parent


def _pydantic_lines(error: Exception) -> list[str]:
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return [f"{'.'.join(map(str, e['loc'])) or '(args)'}: {e['msg']}" for e in error.errors()]
    return [str(error)]
