"""A real node agent process on loopback, for tests that attack it as a network peer would.

It runs ``--insecure``: these tests attack the agent's bounds, which hold whoever the caller
is; tests/security/test_mtls.py attacks its authentication. Its control plane (NodeAgent,
Monitor) is on its own port, as always; ``connect`` routes each method to its port.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
_SERIAL = itertools.count()


class AgentProcess:
    """``python -m amp4ec.node_agent FLAGS`` with its port read back; RSS read from /proc."""

    def __init__(self, workdir: Path, *flags: str) -> None:
        serial = next(_SERIAL)
        port_file = workdir / f"agent{serial}.port"
        control_file = workdir / f"agent{serial}.control-port"
        self.log = workdir / f"agent{serial}.log"
        port_file.unlink(missing_ok=True)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        }
        env.pop("AMP4EC_ALLOW_FACTORIES", None)  # the default: no factory allowed over the network
        cmd = [sys.executable, "-m", "amp4ec.node_agent", "--port", "0", "--port-file", str(port_file)]
        cmd += ["--insecure", "--control-port", "0", "--control-port-file", str(control_file)]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [*cmd, "--cpu-limit", "1", *flags], stdout=log, stderr=log, env=env
            )
        wait_for(lambda: port_file.exists() or self.process.poll() is not None, 120, "the agent's port", 0.02)
        assert self.process.poll() is None, self.log_tail()
        self.address = f"127.0.0.1:{int(port_file.read_text())}"
        self.control_address = f"127.0.0.1:{int(control_file.read_text())}"  # written before the data port
        with grpc.insecure_channel(self.address) as channel:
            health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=60, wait_for_ready=True
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_CONTROL = ("/amp4ec.wire.v1.NodeAgent/", "/amp4ec.wire.v1.Monitor/")


class Routed:
    """One "channel" over the agent's two ports: stubs and raw calls of NodeAgent and Monitor
    go to its control port, everything else to its data port."""

    def __init__(self, agent: AgentProcess, **options: Any) -> None:
        opts = list(options.items())
        self.data = grpc.insecure_channel(agent.address, options=opts)
        self.control = grpc.insecure_channel(agent.control_address, options=opts)

    def _pick(self, method: str) -> grpc.Channel:
        return self.control if method.startswith(_CONTROL) else self.data

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._pick(method).unary_unary(method, *args, **kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._pick(method).unary_stream(method, *args, **kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._pick(method).stream_unary(method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._pick(method).stream_stream(method, *args, **kwargs)

    def close(self) -> None:
        self.data.close()
        self.control.close()

    def __enter__(self) -> Routed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(agent: AgentProcess, **options: Any) -> Routed:
    return Routed(agent, **options)
