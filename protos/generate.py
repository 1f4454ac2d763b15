"""Regenerate the Python code of the gRPC API from protos/moe_cluster/v1/*.proto.

    python -m protos.generate [--out DIR]

Run from the repository root with the pinned grpcio-tools (see pyproject's test extra); the generated files
are committed, and tests/test_protos.py fails when they differ from a fresh generation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted((ROOT / "protos").rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    for proto in PROTOS:
        rel = proto.relative_to(ROOT)
        args = ["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out}", f"--pyi_out={out}",
                f"--grpc_python_out={out}", str(rel)]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed for {rel}")
    return sorted(p for p in out.rglob("*_pb2*.py*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write protos/... under")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out), file=sys.stderr)


if __name__ == "__main__":
    main()
