"""The package builds as a wheel with its generated protocol code, and that wheel installs into
a fresh virtual environment (no system site-packages) where ``amp4ec --help`` runs, and a short
``amp4ec run`` (two node agents, mutual TLS) answers like the monolith.

[Note: borrowed agent dependencies] ``pip install amp4ec-*.whl`` installs the base
dependencies into the fresh venv; the ``agent`` extra (torch, numpy, grpcio, aiohttp) comes
from this test's own environment through one ``.pth`` line appended after the venv's
site-packages, since installing CPU torch per run would download ~200 MB. So the run exercises
the wheel's own code (amp4ec is imported from the venv, which the test checks, and the agents
it starts are the venv's too), not the resolution of the extra from an index.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import aiohttp
import google.protobuf
import grpc
import grpc_health.v1
import numpy
import torch

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

    _borrow_agent_dependencies(venv)
    run = subprocess.run(
        [str(venv / "bin/amp4ec"), "run", "--model", "mobilenet_v2", "--input-shape", "1,3,32,32",
         "--nodes", "0.5,0.5", "--strategy", "equal", "--requests", "3", "--cpu-limits", "none",
         "--json", "run.json"],
        capture_output=True, text=True, timeout=300, env=CLEAN_ENV, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "run.json").read_text())
    assert (result["answered"], result["failed"], result["transport"]) == (3, 0, "mutual TLS")
    assert sorted((s["pipeline"], s["node"]) for s in result["plan"]) == [(0, "node0"), (0, "node1")]
    assert result["max_abs_diff"] < 1e-4  # one pipeline of two stages: a hop, answered like the monolith


def _borrow_agent_dependencies(venv: Path) -> None:
    """See [Note: borrowed agent dependencies]."""
    purelib = subprocess.run(
        [str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60, env=CLEAN_ENV,
    ).stdout.strip()  # fmt: skip
    modules = (torch, numpy, grpc, grpc_health.v1, aiohttp, google.protobuf)
    # The folder holding each top-level package: a package's __init__ sits one level per dot deeper.
    folders = {str(Path(m.__file__).resolve().parents[m.__name__.count(".") + 1]) for m in modules}
    (Path(purelib) / "amp4ec-test-agent-deps.pth").write_text("\n".join(sorted(folders)) + "\n")
