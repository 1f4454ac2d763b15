"""The committed gRPC code is exactly what the pinned generator makes from the .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from protos.generate import ROOT, generate


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert fresh, "nothing was generated"
    for path in fresh:
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is not committed"
        assert committed.read_text() == path.read_text(), \
            f"{committed.relative_to(ROOT)} is stale: run python -m protos.generate"


def test_protos_package_imports_cleanly_in_a_fresh_interpreter() -> None:
    code = ("from protos.moe_cluster.v1 import generation_pb2 as pb, generation_pb2_grpc as g; "
            "print(pb.DESCRIPTOR.services_by_name['GenerationService'].full_name, g.GenerationServiceStub.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.split() == ["moe_cluster.v1.GenerationService", "GenerationServiceStub"]


def test_every_field_and_message_is_commented() -> None:
    lines = (ROOT / "protos/moe_cluster/v1/generation.proto").read_text().splitlines()
    for i, line in enumerate(lines):
        s = line.strip()
        is_decl = (s.startswith(("message ", "enum ", "rpc ", "service ")) or
                   (s.endswith(";") and "=" in s and not s.startswith(("syntax", "package", "//"))))
        if is_decl:
            assert lines[i - 1].strip().startswith("//"), f"line {i + 1} has no comment: {s}"
