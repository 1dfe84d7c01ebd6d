"""Slow links into each node: a network namespace, a veth pair shaped by ``tc tbf``, a delaying proxy.

Path of a request from any upstream stage to node k (agents stay on loopback):

    upstream ─▶ 198.18.k.2:P (proxy in namespace k, adds the delay)
             ─▶ veth (tbf) ─▶ 198.18.k.1:Q (relay in this namespace) ─▶ 127.0.0.1:agent k

Both veth ends are shaped, so data crosses a rate limit each way. Addresses come from
198.18.0.0/15, the range reserved for benchmarks (RFC 2544), and live only on the veths
made here. Everything made (namespaces, veths, proxies) is removed on exit, Ctrl-C
included; namespaces left by a killed run are removed at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from amp4ec.bench.configs import Configuration, LinkShape
from amp4ec.children import child_env
from amp4ec.errors import Amp4ecError
from amp4ec.local.cluster import LocalCluster
from amp4ec.planner.types import Link
from amp4ec.wire import transport
from amp4ec.wire.v1 import agent_pb2, agent_pb2_grpc

__all__ = ["ShapedLinks", "links_available", "shaped_for"]

_PREFIX = "amp4ec-"


def links_available() -> str | None:
    """None when namespaces and tc can be used here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs the {tool} command"
    return None


def _ip(*args: str, namespace: str | None = None) -> None:
    cmd = ["ip", "netns", "exec", namespace, *args] if namespace else list(args)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise Amp4ecError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")


def remove_stale() -> None:
    """Delete namespaces of earlier runs whose process is gone (their veths go with them)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        mine = name.startswith(_PREFIX) and len(parts) == 3 and parts[1].isdigit()
        if mine and not Path(f"/proc/{parts[1]}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


class ShapedLinks:
    """``async with ShapedLinks(shape, {node: agent address}, pid) as links``: hop(node) is the
    address upstream stages send to; links() measures every node-to-node link through the same
    shaped path to the agent's control port (``probes``: Echo is served there, not on the data port)."""

    def __init__(
        self, shape: LinkShape, targets: dict[str, str], pid: int, probes: dict[str, str] | None = None
    ) -> None:
        self.shape = shape
        self.targets = targets
        self.pid = pid
        self.probes = probes or {}
        self.namespaces: list[str] = []
        self.host_links: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self._hops: dict[str, str] = {}
        self._probe_hops: dict[str, str] = {}
        self._workdir: Path | None = None

    async def __aenter__(self) -> ShapedLinks:
        why = links_available()
        if why is not None:
            raise Amp4ecError(f"slow links: {why}")
        remove_stale()
        self._workdir = Path(tempfile.mkdtemp(prefix="amp4ec-links-"))
        try:
            for k, (node, target) in enumerate(self.targets.items()):
                self._hops[node], self._probe_hops[node] = await self._make(k, target, self.probes.get(node))
        except BaseException:
            self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def hop(self, node: str) -> str:
        return self._hops[node]

    async def _make(self, k: int, target: str, probe_target: str | None) -> tuple[str, str]:
        ns, host_if, ns_if = (
            f"{_PREFIX}{self.pid}-{k}",
            f"a4h{self.pid % 100000}x{k}",
            f"a4n{self.pid % 100000}x{k}",
        )
        outer, inner = f"198.18.{k}.1", f"198.18.{k}.2"
        _ip("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        _ip("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        self.host_links.append(host_if)
        _ip("ip", "link", "set", ns_if, "netns", ns)
        _ip("ip", "addr", "add", f"{outer}/30", "dev", host_if)
        _ip("ip", "link", "set", host_if, "up")
        _ip("ip", "addr", "add", f"{inner}/30", "dev", ns_if, namespace=ns)
        _ip("ip", "link", "set", ns_if, "up", namespace=ns)
        _ip("ip", "link", "set", "lo", "up", namespace=ns)
        tbf = ["root", "tbf", "rate", f"{self.shape.rate_mbit}mbit", "burst", "32kb", "latency", "400ms"]
        _ip("tc", "qdisc", "add", "dev", host_if, *tbf)
        _ip("tc", "qdisc", "add", "dev", ns_if, *tbf, namespace=ns)
        hops = []
        for kind, to in (("", target), ("probe", probe_target)):
            if to is None:
                hops.append("")
                continue
            relay = await self._proxy(f"relay{kind}{k}", f"{outer}:0", to, 0.0, None)
            port = await self._proxy(
                f"delay{kind}{k}", f"{inner}:0", f"{outer}:{relay}", self.shape.delay_ms, ns
            )
            hops.append(f"{inner}:{port}")
        return hops[0], hops[1]

    async def _proxy(self, name: str, listen: str, target: str, delay_ms: float, ns: str | None) -> int:
        assert self._workdir is not None
        port_file = self._workdir / f"{name}.port"
        cmd = [sys.executable, "-m", "amp4ec.bench.proxy", "--listen", listen, "--target", target]
        cmd += ["--delay-ms", repr(delay_ms), "--port-file", str(port_file)]
        if ns:
            cmd = ["ip", "netns", "exec", ns, *cmd]
        process = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=child_env(),  # no preexec_fn: see [Note: no preexec_fn] in amp4ec.children
            start_new_session=True,
        )
        self.processes.append(process)
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if process.poll() is not None:
                err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                raise Amp4ecError(f"link proxy {name} exited with code {process.returncode}: {err.strip()}")
            if time.monotonic() > deadline:
                raise Amp4ecError(f"link proxy {name} did not start in 30 s")
            await asyncio.sleep(0.02)
        return int(port_file.read_text())

    async def links(
        self,
        names: Sequence[str],
        loopback: Sequence[Link],
        security: transport.TransportSecurity,
        identity: Callable[[str], str],
    ) -> list[Link]:
        """Node-to-node links measured through the shaped path; client links as on loopback."""
        out = [link for link in loopback if link.src == "client"]
        for node in names:
            rtt, bandwidth = await probe(self._probe_hops[node], security, identity(node))
            out += [Link(src, node, rtt, bandwidth) for src in names if src != node]
        return out

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        # Deleting a veth end removes the pair at once; deleting only its namespace leaves the
        # host end to the kernel's deferred namespace cleanup, which outlives this call.
        for link in self.host_links:
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
        self.host_links.clear()
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self.namespaces.clear()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


async def probe(
    address: str, security: transport.TransportSecurity, identity: str, payload_bytes: int = 512 * 1024
) -> tuple[float, float]:
    """(round-trip ms, bytes/s) of a gRPC Echo to ``address``, as LocalCluster.probe_link does."""
    async with transport.channel(address, security, expect_identity=identity) as channel:
        stub = agent_pb2_grpc.NodeAgentStub(channel)

        async def timed(payload: bytes) -> float:
            start = time.perf_counter()
            await stub.Echo(agent_pb2.Probe(payload=payload), timeout=60)
            return (time.perf_counter() - start) * 1000

        await timed(b"")
        rtt = min([await timed(b"") for _ in range(10)])  # the fastest try, as LocalCluster.probe_link
        big = bytes(payload_bytes)
        transfer = min([await timed(big) for _ in range(3)])
    return rtt, payload_bytes / max((transfer - rtt) / 1000, 1e-6)


@contextlib.asynccontextmanager
async def shaped_for(
    config: Configuration, cluster: LocalCluster, names: list[str]
) -> AsyncIterator[ShapedLinks | None]:
    """``config``'s shaped links into each of ``names`` (None when its links are loopback)."""
    if config.links is None:
        yield None
        return
    targets = {n: cluster.address(n) for n in names}
    probes = {n: cluster.control_address(n) for n in names}  # Echo lives on the control port
    async with ShapedLinks(config.links, targets, os.getpid(), probes) as shaped:
        yield shaped
