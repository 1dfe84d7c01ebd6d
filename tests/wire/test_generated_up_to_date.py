"""The committed gRPC code is exactly what hack/gen-protos.sh makes from protos/."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "hack/gen-protos.sh"), str(tmp_path)], check=True, env=env)
    for package in ("amp4ec/wire/v1", "amp4ec/wire/oip"):
        _compare(tmp_path / package, ROOT / package)


def _compare(generated_dir: Path, committed_dir: Path) -> None:
    generated = sorted(generated_dir.glob("*_pb2*.py*"))
    assert generated, f"codegen produced nothing in {generated_dir}"
    for fresh in generated:
        committed = committed_dir / fresh.name
        assert committed.exists(), f"{committed} is missing: run hack/gen-protos.sh"
        assert committed.read_text() == fresh.read_text(), f"{committed.name} drifted: run hack/gen-protos.sh"
