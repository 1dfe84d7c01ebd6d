"""The package builds as a wheel with its generated protocol code, and that wheel installs into
a fresh virtual environment (no system site-packages) where ``amp4ec --help`` runs."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The fresh venv must not see this checkout or the test run's environment.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def test_the_wheel_installs_into_a_fresh_venv_and_runs(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = dist.glob("amp4ec-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for generated in ("amp4ec/wire/v1/shard_pb2.py", "amp4ec/wire/v1/agent_pb2_grpc.py"):
        assert generated in names
    for generated in ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2_grpc.py", "grpc_predict_v2_pb2.pyi"):
        assert f"amp4ec/wire/oip/{generated}" in names
    assert "amp4ec/py.typed" in names and not any(n.startswith("tests/") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run(
        [str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        env=CLEAN_ENV,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    reply = subprocess.run(
        [str(venv / "bin/amp4ec"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=CLEAN_ENV,
        cwd=tmp_path,
    )
    assert reply.returncode == 0, reply.stderr
    for command in ("run", "serve", "plan", "infer", "models"):
        assert f"  {command} " in reply.stdout
    # Only the wheel's own environment: not this checkout, not the test venv's packages.
    where = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "import amp4ec, sys; print(amp4ec.__file__); print(sys.flags.no_site)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=CLEAN_ENV,
    )
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
