"""Regenerate the KubeRay JSON schemas in this folder from the CRDs of a KubeRay commit (see README.md).

    python tests/data/kuberay/refresh.py                      # the pinned commit, fetched from GitHub
    python tests/data/kuberay/refresh.py --commit <sha>       # another commit (then update README.md)
    python tests/data/kuberay/refresh.py --crd-dir DIR        # CRD YAML files already downloaded into DIR

Each schema is the ``openAPIV3Schema`` of the CRD's ``ray.io/v1`` version, written as JSON (sorted keys, one
space of indent) with a ``$comment`` naming its source. Not a test module: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import json
import urllib.request
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
COMMIT = "feeaf72facab4881ba2b179248bb67315634e229"  # ray-project/kuberay, August 2026
BASES = "ray-operator/config/crd/bases"
VERSION = "v1"
SCHEMAS = {  # CRD file in BASES -> schema file here
    "ray.io_rayclusters.yaml": "raycluster.ray.io_v1.schema.json",
    "ray.io_rayservices.yaml": "rayservice.ray.io_v1.schema.json",
}


def read_crd(name: str, commit: str, crd_dir: Path | None) -> str:
    if crd_dir is not None:
        return (crd_dir / name).read_text()
    url = f"https://raw.githubusercontent.com/ray-project/kuberay/{commit}/{BASES}/{name}"
    with urllib.request.urlopen(url, timeout=60) as reply:
        text: str = reply.read().decode()
    return text


def extract(crd_text: str, name: str, commit: str) -> str:
    crd = yaml.safe_load(crd_text)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == VERSION]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    comment = (f"openAPIV3Schema of version {VERSION} extracted from ray-project/kuberay {BASES}/{name} "
               f"at commit {commit}")
    return json.dumps({"$comment": comment, **schema}, indent=1, sort_keys=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default=COMMIT, help="full KubeRay commit hash (default: %(default)s)")
    parser.add_argument("--crd-dir", type=Path, help="read the CRD YAML files from here instead of GitHub")
    args = parser.parse_args()
    for crd_name, schema_name in SCHEMAS.items():
        (HERE / schema_name).write_text(extract(read_crd(crd_name, args.commit, args.crd_dir), crd_name, args.commit))
        print(f"wrote {schema_name} from {crd_name} at {args.commit}")


if __name__ == "__main__":
    main()
