"""LocalCluster: one node-agent process per emulated node, each under its own CPU limit.

Lifecycle: start every agent (in parallel) → wait until each answers its health check →
measure capacities → load layer ranges → stop. Every process and cgroup it made is
removed on exit, Ctrl-C included; a child also dies with its parent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from amp4ec import pki
from amp4ec.children import child_env
from amp4ec.client import Client, Endpoint
from amp4ec.errors import Amp4ecError, InvalidSpec
from amp4ec.local.cgroups import PERIOD_US, NodeCgroup, cgroups_available, remove_stale
from amp4ec.nodes import (
    AGENT_BASELINE_BYTES,
    CFS_PERIODS,
    NodeSpec,
    mib,
    parse_bytes,
    parse_nodes,
    usable_memory,
)
from amp4ec.wire import transport
from amp4ec.wire.v1 import agent_pb2, agent_pb2_grpc, shard_pb2

# NodeSpec, parse_bytes and parse_nodes live in amp4ec.nodes (torch-free); re-exported here.
__all__ = ["CLIENT_IDENTITY", "LIMIT_MODES", "LocalCluster", "NodeSpec", "parse_bytes", "parse_nodes"]

log = logging.getLogger(__name__)
LIMIT_MODES = ("auto", "cgroup", "emulate", "none")
_CGROUP_PREFIX = "amp4ec-"
_SERIALS = itertools.count()
CLIENT_IDENTITY = pki.client_identity("local", "run")
"""The identity of local mode's clients: the only one an entry stage accepts frames from."""


@dataclass
class _Agent:
    node: NodeSpec
    process: subprocess.Popen[bytes]
    port_file: Path
    control_port_file: Path
    log_path: Path
    cgroup: NodeCgroup | None = None
    address: str = ""
    """host:port of the data plane, known once the agent has written its port file."""
    control_address: str = ""
    """host:port of the control plane (NodeAgent), which only the supervisor may call."""

    def exit_reason(self) -> str:
        code = self.process.returncode
        limit = self.node.memory_bytes
        if limit and self.cgroup is not None and self.cgroup.oom_kills():
            return (
                f"ran out of memory: the kernel killed it at its {mib(limit)} limit (the agent itself "
                f"needs about {mib(AGENT_BASELINE_BYTES)} before its shard; give the node more memory)"
            )
        if code == -signal.SIGKILL and limit:
            return f"was killed (SIGKILL): most likely out of memory under its {mib(limit)} limit"
        return f"exited with code {code}"

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


class LocalCluster:
    """Node agents as local processes. Use as ``async with LocalCluster(nodes) as cluster``.

    With ``secure`` (the default) every hop is mutual TLS under a CA made for this cluster
    alone: its key never leaves this process, each agent gets a leaf for ``agent.<node>``
    (key 0600 in a 0700 temporary directory, removed on stop), this process acts as the
    operator (the only identity the agents' control plane accepts) and its clients as
    ``CLIENT_IDENTITY``.
    """

    def __init__(
        self,
        nodes: Sequence[NodeSpec],
        limit_mode: str = "auto",
        start_timeout_s: float = 180,
        allow_factories: Sequence[str] = (),
        secure: bool = True,
        cfs_period_us: int = PERIOD_US,
    ) -> None:
        if limit_mode not in LIMIT_MODES:
            raise InvalidSpec(f"--cpu-limits: expected one of {', '.join(LIMIT_MODES)}, got {limit_mode!r}")
        if limit_mode == "cgroup" and not cgroups_available():
            raise InvalidSpec("--cpu-limits cgroup: this process may not create cgroup v1 CPU quotas (root?)")
        self.chosen_mode = limit_mode
        """The ``--cpu-limits`` asked for (``auto`` resolves to ``limit_mode``)."""
        if limit_mode == "auto":
            limit_mode = "cgroup" if cgroups_available() else "emulate"
        self.nodes = list(nodes)
        self.limit_mode = limit_mode
        self.cfs_period_us = cfs_period_us
        """CFS period of every node's quota (cgroup mode): see [Note: why a short CFS period]."""
        self.start_timeout_s = start_timeout_s
        self.allow_factories = tuple(allow_factories)
        """Modules the agents may import factories from: the one the user named, if any."""
        self.agents: dict[str, _Agent] = {}
        self._workdir: Path | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._serial = next(_SERIALS)
        self._spawned = itertools.count()
        """Index of the next agent started (cgroup names stay unique as nodes come and go)."""
        self.secure = secure
        self.security = transport.TransportSecurity.plaintext()
        """This process as the operator (the control plane's only caller)."""
        self.client_security = transport.TransportSecurity.plaintext()
        """This process as a client of the pipelines' entry stages."""
        self._ca: pki.CertificateAuthority | None = None

    @property
    def limit_description(self) -> str:
        return {
            "cgroup": f"cgroup v1 CFS quota per node ({self.cfs_period_us / 1000:g} ms period"
            + (", as Docker --cpus)" if self.cfs_period_us == CFS_PERIODS["docker"] else ")"),
            "emulate": "emulated: each agent idles after a forward to match its share "
            + ("(--cpu-limits emulate)" if self.chosen_mode == "emulate" else "(no cgroup permission)"),
            "none": "none: agents share the machine unlimited",
        }[self.limit_mode]

    async def __aenter__(self) -> LocalCluster:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def agent_stub(self, node: str) -> agent_pb2_grpc.NodeAgentStub:
        return agent_pb2_grpc.NodeAgentStub(self._channel(node))

    def address(self, node: str) -> str:
        return self.agents[node].address

    @property
    def node_names(self) -> list[str]:
        """The nodes whose agents run here (started or added, not removed), in start order."""
        return list(self.agents)

    def control_address(self, node: str) -> str:
        """host:port of ``node``'s control plane (``NodeAgent``, whose ``Echo`` link probes call)."""
        return self.agents[node].control_address

    def memory_limit(self, node: str) -> int | None:
        """The memory limit ``node`` was started with, in bytes (None: none)."""
        return self.agents[node].node.memory_bytes

    def exited(self) -> dict[str, str]:
        """The agents whose process has exited, each with why (out of memory, a signal, its code)."""
        return {name: a.exit_reason() for name, a in self.agents.items() if a.process.poll() is not None}

    def send_signal(self, node: str, signum: int) -> None:
        """Send ``signum`` to ``node``'s agent, if it still runs (fault injection: SIGKILL, SIGSTOP)."""
        self.agents[node].process.send_signal(signum)

    def kill(self, node: str) -> None:
        """Kill ``node``'s agent if it still runs, and continue it, so a stopped one dies now."""
        process = self.agents[node].process
        if process.poll() is None:
            process.kill()
            os.kill(process.pid, signal.SIGCONT)

    @staticmethod
    def identity(node: str) -> str:
        """The identity ``node``'s agent presents (under mutual TLS)."""
        return pki.agent_identity(node)

    def client(self, nodes: Sequence[str]) -> Client:
        """A client of the stages served on ``nodes`` (entry stages), as ``CLIENT_IDENTITY``."""
        entries = [Endpoint(self.address(n), f"stage 0 on {n}", self.identity(n)) for n in nodes]
        return Client(entries, self.client_security)

    def issue(self, identity: str, hosts: Sequence[str] = ()) -> transport.TransportSecurity:
        """Mutual TLS material for another party of this cluster (``amp4ec serve``'s front door
        and its users; tests: a forged next hop). ``hosts``: see ``pki.CertificateAuthority.issue``."""
        if self._ca is None:
            raise InvalidSpec("issue: this cluster runs insecure (no CA)")
        pair = self._ca.issue(identity, hosts=hosts)
        return transport.TransportSecurity(self._ca.cert_pem, pair.cert_pem, pair.key_pem)

    def _channel(self, node: str) -> grpc.aio.Channel:
        if node not in self._channels:
            self._channels[node] = transport.channel(
                self.agents[node].control_address, self.security, expect_identity=self.identity(node)
            )
        return self._channels[node]

    async def start(self) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix="amp4ec-local-"))  # 0700: it holds private keys
        if self.secure:
            self._ca = pki.CertificateAuthority.create(f"amp4ec local CA {os.getpid()}-{self._serial}")
            (self._workdir / "ca.crt").write_bytes(self._ca.cert_pem)
            self.security = self.issue(pki.OPERATOR)
            self.client_security = self.issue(CLIENT_IDENTITY)
        if self.limit_mode == "cgroup":
            remove_stale(_CGROUP_PREFIX)
        for node in self.nodes:
            self.agents[node.name] = self._spawn(next(self._spawned), node)
        await asyncio.gather(*(self._wait_ready(a) for a in self.agents.values()))

    async def add(self, nodes: Sequence[NodeSpec]) -> None:
        """Start agents for more nodes (``amp4ec serve`` when its nodes file grows); they
        answer their health check when this returns, or are stopped again."""
        if self._workdir is None:
            raise InvalidSpec("add: the cluster is not started")
        taken = [n.name for n in nodes if n.name in self.agents]
        if taken:
            raise InvalidSpec(f"nodes: {taken[0]} already runs an agent")
        for node in nodes:
            self.agents[node.name] = self._spawn(next(self._spawned), node)
            self.nodes.append(node)
        try:
            await asyncio.gather(*(self._wait_ready(self.agents[n.name]) for n in nodes))
        except BaseException:
            await self.remove([n.name for n in nodes])
            raise

    async def remove(self, names: Sequence[str]) -> None:
        """Stop these nodes' agents and remove their cgroups (nothing they served is moved)."""
        for name in names:
            channel = self._channels.pop(name, None)
            if channel is not None:
                with contextlib.suppress(Exception):
                    await channel.close()
        self._stop_agents([self.agents.pop(n) for n in names if n in self.agents])
        self.nodes = [n for n in self.nodes if n.name not in names]

    def _spawn(self, index: int, node: NodeSpec) -> _Agent:
        assert self._workdir is not None
        cgroup = None
        if self.limit_mode == "cgroup":
            name = f"{_CGROUP_PREFIX}{os.getpid()}-{self._serial}-{index}"  # unique per cluster
            cgroup = NodeCgroup(name, node.cpu, node.memory_bytes, self.cfs_period_us)
        port_file = self._workdir / f"{node.name}.port"
        control_port_file = self._workdir / f"{node.name}.control-port"
        log_path = self._workdir / f"{node.name}.log"
        for stale in (port_file, control_port_file):  # a node restarted under its name (amp4ec serve)
            stale.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "amp4ec.node_agent",
            "--node",
            node.name,
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--control-port",
            "0",
            "--control-port-file",
            str(control_port_file),
            "--cpu-limit",
            repr(node.cpu),
        ]
        if self._ca is not None:
            cert, key = self._ca.issue(self.identity(node.name)).write(self._workdir, node.name)
            cmd += ["--tls-ca", str(self._workdir / "ca.crt"), "--tls-cert", str(cert), "--tls-key", str(key)]
        else:
            cmd.append("--insecure")
        if self.limit_mode == "emulate":
            cmd.append("--emulate-cpu")
        if node.memory_bytes:  # the planner is offered what is left after the agent itself
            cmd += ["--memory-bytes", str(max(1, usable_memory(node) or 0))]
        if node.threads:
            cmd += ["--threads", str(node.threads)]
        cmd += ["--workers", str(node.workers)]
        for module in self.allow_factories:
            cmd += ["--allow-factory", module]

        with open(log_path, "wb") as log_file:  # no preexec_fn: see [Note: no preexec_fn]
            process = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True
            )
        if cgroup is not None:
            try:
                cgroup.add(process.pid)  # before the agent has even imported torch
            except OSError:
                process.kill()
                process.wait()
                cgroup.remove()
                raise
        return _Agent(node, process, port_file, control_port_file, log_path, cgroup)

    async def _wait_ready(self, agent: _Agent) -> None:
        port_file = agent.port_file
        deadline = time.monotonic() + self.start_timeout_s
        while not port_file.exists():
            if agent.process.poll() is not None:
                raise Amp4ecError(f"node agent {agent.node.name} {agent.exit_reason()}:\n{agent.log_tail()}")
            if time.monotonic() > deadline:
                raise Amp4ecError(
                    f"node agent {agent.node.name} did not start in {self.start_timeout_s:.0f} s"
                )
            await asyncio.sleep(0.05)
        agent.address = f"127.0.0.1:{int(port_file.read_text())}"
        # The agent writes its control port file before its data port file.
        agent.control_address = f"127.0.0.1:{int(agent.control_port_file.read_text())}"
        stub = health_pb2_grpc.HealthStub(self._channel(agent.node.name))
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30, wait_for_ready=True)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise Amp4ecError(f"node agent {agent.node.name} is not serving")

    def resident_bytes(self, node: str) -> int | None:
        """The node agent's resident memory as its memory cgroup counts it; None when the node
        has no memory cgroup (no limit, or limits emulated)."""
        cgroup = self.agents[node].cgroup
        return cgroup.resident_bytes() if cgroup is not None else None

    def set_memory_limit(self, node: str, limit_bytes: int) -> None:
        """Change the node's memory limit (its cgroup's); the node must have one."""
        cgroup = self.agents[node].cgroup
        if cgroup is None or cgroup.resident_bytes() is None:
            raise ValueError(f"node {node} has no memory cgroup (started without a memory limit)")
        cgroup.set_memory_limit(limit_bytes)

    async def capacities(self, nodes: Sequence[str] | None = None) -> dict[str, agent_pb2.Capacity]:
        """Each agent's capacity (of ``nodes``, default all), measured under its own limit, all at once."""
        names = list(self.agents if nodes is None else nodes)
        replies = await asyncio.gather(
            *(self.agent_stub(n).GetCapacity(agent_pb2.CapacityRequest(), timeout=60) for n in names)
        )
        return dict(zip(names, replies, strict=True))

    async def serving(self, node: str, timeout_s: float) -> bool:
        """Whether ``node``'s agent answers its health check SERVING within ``timeout_s``."""
        stub = health_pb2_grpc.HealthStub(self._channel(node))
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def probe_link(self, node: str, payload_bytes: int = 2 * 1024 * 1024) -> tuple[float, float]:
        """(round-trip ms, bytes/s) from this process to ``node``'s agent, measured with Echo.

        The receiving agent's CPU limit is part of the link: decoding a frame costs its CPU.
        The fastest of several tries is the link's capacity; slower tries measured whatever
        else the machine was doing at the time.
        """
        stub = self.agent_stub(node)

        async def timed(payload: bytes) -> float:
            start = time.perf_counter()
            await stub.Echo(agent_pb2.Probe(payload=payload), timeout=30)
            return (time.perf_counter() - start) * 1000

        await timed(b"")  # connect
        rtt = min([await timed(b"") for _ in range(10)])
        big = bytes(payload_bytes)
        transfer = min([await timed(big) for _ in range(5)])
        return rtt, payload_bytes / max((transfer - rtt) / 1000, 1e-6)

    async def load(self, node: str, spec: agent_pb2.StageSpec, timeout_s: float = 300) -> shard_pb2.ShardInfo:
        try:
            return await self.agent_stub(node).LoadStage(spec, timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            what = f"node {node} could not load blocks {spec.first_block}..{spec.last_block}"
            agent = self.agents[node]
            connection_lost = e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN)
            if connection_lost and await asyncio.to_thread(_exited, agent.process, 5.0):
                raise Amp4ecError(f"{what}: its agent {agent.exit_reason()}") from None
            raise Amp4ecError(f"{what}: {e.details()}") from None

    @staticmethod
    def _stop_agents(agents: Sequence[_Agent]) -> None:
        for agent in agents:
            if agent.process.poll() is None:
                agent.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for agent in agents:
            try:
                agent.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                agent.process.kill()
                agent.process.wait()
            if agent.cgroup is not None:
                agent.cgroup.remove()

    async def stop(self) -> None:
        for channel in self._channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
        self._channels.clear()
        self._stop_agents(list(self.agents.values()))
        self.agents.clear()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


def _exited(process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Whether ``process`` has exited or exits within ``timeout_s`` (a dying agent closes its
    sockets a moment before the kernel reaps it)."""
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False
    return True
