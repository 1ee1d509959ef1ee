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
import sys
from pathlib import Path

import yaml

from hispec.cluster.crd import DEFAULT_SCHEMA, load_schema
from hispec.cluster.launcher import ray_config_errors
from hispec.cluster.manifest import manifest_errors
from hispec.cluster.rendering import RenderError, _load_all, drift, render
from hispec.cluster.serve_config import MODEL_ROOT, _bundled_models

DEFAULT_DEPLOY = Path("deploy/hispec-gpu.yaml")
DEFAULT_MANIFEST = Path("cluster/rayservice.yaml")
DEFAULT_RAY_CONFIG = Path("ray_config.yaml")


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
