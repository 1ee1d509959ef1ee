"""Extracts what the tests validate against from KubeRay's RayService CRD: the openAPIV3Schema of
its served storage version (v1), unchanged, as JSON.

    python cluster/schemas/extract.py ../shared/kuberay-crds/ray.io_rayservices.yaml \
        cluster/schemas/rayservice.v1.schema.json

The source is ray-project/kuberay's ray-operator/config/crd/bases/ray.io_rayservices.yaml (see
README.md here for the exact commit), Apache-2.0 (LICENSE here). tests/unit/test_cluster_manifests.py
re-runs this extraction when the CRD file is present and compares it with the stored copy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def extract(crd_path: Path, version: str = "v1") -> dict:
    crd = yaml.load(Path(crd_path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    if crd.get("kind") != "CustomResourceDefinition":
        raise ValueError(f"{crd_path} is not a CustomResourceDefinition")
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return entry["schema"]["openAPIV3Schema"]


def dump(schema: dict) -> str:
    return json.dumps(schema, indent=1, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    Path(argv[1]).write_text(dump(extract(Path(argv[0]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
