"""``amp4ec serve``: local mode that stays up behind the Open Inference Protocol.

Plan over local node agents (mutual TLS by default, as ``amp4ec run``), serve the v2 REST and
gRPC front doors, fail over as ``amp4ec run`` does, and re-plan when the nodes file changes.

[Note: front door TLS] Unless ``--insecure``, the front doors speak TLS with a certificate from
the run's CA (identity ``frontdoor.local.amp4ec``, plus ``localhost``, the loopback addresses
and the listening host, which curl checks). The CA certificate and a client certificate
(``client.serve.local.amp4ec``: it may call the front doors, not the agents) are written to
``--tls-dir`` (default: a fresh 0700 temporary directory), keys 0600, and removed on exit;
the printed ``try:`` line uses them. With ``--client-auth required`` (the default) a caller
must present that client certificate; ``none`` asks for none (TLS still proves the server).

[Note: nodes file] ``--nodes-file`` names one node a line, ``NAME CPU[:MEMORY]`` (``#``
comments). It is re-read when its content changes (checked every ``poll_s``; polling needs no
platform watcher and survives editors that replace the file). On a change, nodes gone or with
a different spec are taken out of service and stopped, new or changed ones started and
measured, and the model re-planned over all of them; pipelines the new plan keeps serve on
while the rest load (Supervisor.switch). A file that does not parse is reported and ignored:
the last good plan keeps serving. A node that failed is restarted by the next change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import shutil
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from amp4ec import pki
from amp4ec.client import Client
from amp4ec.compression import Compression
from amp4ec.errors import Amp4ecError, InvalidSpec
from amp4ec.frontdoor import listen
from amp4ec.frontdoor.door import ClientBackend, FrontDoor
from amp4ec.frontdoor.model import DATATYPES, ModelMeta, model_meta
from amp4ec.local.cgroups import PERIOD_US
from amp4ec.local.cluster import LocalCluster
from amp4ec.local.run import deploy, node_capacities
from amp4ec.local.supervisor import Supervisor, endpoints
from amp4ec.nodes import NodeSpec, parse_bytes
from amp4ec.plan_timer import timed_plan
from amp4ec.planner.types import Link, NodeCapacity, Plan
from amp4ec.slicing import ModelSource
from amp4ec.slicing.prepare import Prepared, compression_options, prepare
from amp4ec.slicing.sources import factory_module
from amp4ec.wire.stage import Batching
from amp4ec.wire.transport import TransportSecurity

__all__ = ["FRONT_DOOR_IDENTITY", "USER_IDENTITY", "ServeConfig", "curl_example", "parse_nodes_file", "serve"]

log = logging.getLogger(__name__)
Say = Callable[[str], None]
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$")
FRONT_DOOR_IDENTITY = "frontdoor.local.amp4ec"
USER_IDENTITY = pki.client_identity("local", "serve")
"""The client certificate written for the user: the front doors accept it, the agents do not."""


@dataclass(frozen=True)
class ServeConfig:
    source: ModelSource
    nodes: tuple[NodeSpec, ...] = ()
    """Fixed nodes (``--nodes``); ignored when ``nodes_file`` is given."""
    nodes_file: Path | None = None
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    """0 = any free port (the printed endpoints say which)."""
    model_name: str = ""
    """The v2 model name; default: the model spec's last part (``mobilenet_v2``)."""
    strategy: str = "optimal"
    objective: str = "throughput"
    rate_rps: float | None = None
    """The arrival rate the ``p95`` objective plans for (requests/s; only with it)."""
    tiles: bool = True
    """Whether the optimal strategy may run leading blocks as row tiles (``planner.plan``)."""
    limit_mode: str = "auto"
    cfs_period_us: int = PERIOD_US
    """CFS period of the nodes' quotas (``--cfs-period``; see [Note: why a short CFS period])."""
    secure: bool = True
    """Mutual TLS to the agents and TLS on the front doors; False: plaintext everywhere."""
    client_auth: bool = True
    """The front doors require the user's client certificate (see [Note: front door TLS])."""
    tls_dir: Path | None = None
    """Where the CA and client certificate go; None: a fresh temporary directory."""
    batching: Batching = field(default_factory=Batching)
    """Dynamic batching in every stage (``--batch``, ``--batch-delay-ms``)."""
    deadline_s: float = 30.0
    poll_s: float = 0.5
    compression: Compression = field(default_factory=Compression)


def parse_nodes_file(text: str, where: str = "nodes file") -> list[NodeSpec]:
    """``NAME CPU[:MEMORY]`` per line → nodes (see [Note: nodes file])."""
    nodes: list[NodeSpec] = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        field = f"{where}:{number}"
        if len(words) != 2:
            raise InvalidSpec(
                f"{field}: expected NAME CPU[:MEMORY], e.g. edge-a 1.0:1G, got {line.strip()!r}"
            )
        name, spec = words
        if not _NAME.match(name):
            raise InvalidSpec(f"{field}: node name {name!r}: expected lower-case letters, digits and '-'")
        if any(n.name == name for n in nodes):
            raise InvalidSpec(f"{field}: node {name!r} is listed twice")
        share, _, memory = spec.partition(":")
        try:
            cpu = float(share)
        except ValueError:
            cpu = math.nan
        if not 0 < cpu < math.inf:
            raise InvalidSpec(f"{field}: CPU share of {name}: expected a number > 0, got {share!r}")
        nodes.append(NodeSpec(name, cpu, parse_bytes(memory, f"{field} memory") if memory else None))
    if not nodes:
        raise InvalidSpec(f"{where}: no nodes listed (one a line: NAME CPU[:MEMORY])")
    return nodes


def curl_example(
    meta: ModelMeta, base_url: str, example_shapes: Sequence[Sequence[int]], curl_tls: str = ""
) -> str:
    """A shell command that sends one input of the model's example shape with the binary tensor
    extension (any input size fits on one line) and prints the JSON answer. FP32 inputs are
    bytes 0x3f repeated (every element 0.747), other datatypes zeros. ``curl_tls``: curl's
    certificate flags."""
    curl = f"curl -s {curl_tls} " if curl_tls else "curl -s "
    if len(meta.inputs) != 1:
        return f"{curl}{base_url}/v2/models/{meta.name}"
    t, shape = meta.inputs[0], list(example_shapes[0])
    itemsize = torch.empty((), dtype=DATATYPES[t.datatype]).element_size()
    size = math.prod(shape) * itemsize
    fill = " | tr '\\000' '\\077'" if t.datatype == "FP32" else ""
    header = (
        f'{{"inputs":[{{"name":"{t.name}","datatype":"{t.datatype}","shape":{shape},'
        f'"parameters":{{"binary_data_size":{size}}}}}]}}'
    ).replace(" ", "")
    return (
        f"H='{header}'; {{ printf %s \"$H\"; head -c {size} /dev/zero{fill}; }} | "
        f'{curl}--data-binary @- -H "Inference-Header-Content-Length: ${{#H}}" '
        f"{base_url}/v2/models/{meta.name}/infer"
    )


class _Serving:
    """The nodes, their measurements and the plan, kept current as nodes come and go."""

    def __init__(self, config: ServeConfig, prepared: Prepared, cluster: LocalCluster, say: Say) -> None:
        self.config, self.prepared, self.cluster, self.say = config, prepared, cluster, say
        self.capacity: dict[str, NodeCapacity] = {}
        self.links: list[Link] = []
        self.supervisor: Supervisor | None = None

    async def measure(self, names: Sequence[str]) -> None:
        capacities = await self.cluster.capacities(names)
        for node in node_capacities(capacities, self.prepared.reference_ms):
            self.capacity[node.name] = node
        for name in names:
            rtt_ms, bandwidth = await self.cluster.probe_link(name)
            self.links += [
                Link(src, name, rtt_ms, bandwidth) for src in ["client", *self.cluster.agents] if src != name
            ]

    def plan(self, alive: Sequence[str]) -> Plan:
        nodes = [self.capacity[n] for n in alive]
        links = [link for link in self.links if {link.src, link.dst} <= {"client", *alive}]
        return timed_plan(
            self.prepared.profiles,
            nodes,
            objective=self.config.objective,
            rate_rps=self.config.rate_rps,
            strategy=self.config.strategy,
            tiles=self.config.tiles,
            input_bytes=self.prepared.chain.input_bytes,
            links=links,
            **compression_options(self.config.compression, self.prepared),
        )[0]

    async def deploy(self, plan: Plan) -> None:
        await deploy(self.cluster, plan, self.config.source, batching=self.config.batching)

    async def reconfigure(self, wanted: Sequence[NodeSpec]) -> None:
        """Serve on exactly ``wanted`` (see [Note: nodes file])."""
        supervisor = self.supervisor
        assert supervisor is not None
        current = {n.name: n for n in self.cluster.nodes}
        by_name = {n.name: n for n in wanted}
        gone = [n for n in current if by_name.get(n) != current[n] or n in supervisor.dead]
        new = [n for n in wanted if n.name not in current or n.name in gone]
        if not gone and not new:
            return
        async with supervisor.lock:
            for name in gone:
                await supervisor.unwatch(name)
            supervisor.retire(gone)
            await self.cluster.remove(gone)
            self.links = [link for link in self.links if link.src not in gone and link.dst not in gone]
            for name in gone:
                supervisor.dead.discard(name)
                self.capacity.pop(name, None)
            await self.cluster.add(new)
            for node in new:
                supervisor.watch(node.name)
            await self.measure([n.name for n in new])
            alive = [n for n in self.cluster.agents if n not in supervisor.dead]
            plan = self.plan(alive)
            await supervisor.switch(plan)
        self.say(f"re-planned on {', '.join(alive)}: {describe(plan)}")


def describe(plan: Plan) -> str:
    """``node0[0-9] (int8) → node1[10-19] | node2[0-19]``: each pipeline's stages and blocks, and
    a stage's output codec when it compresses."""
    return " | ".join(
        " → ".join(f"{s.node}[{s.first_block}-{s.last_block}]" + _codec(s.out_codec) for s in p.stages)
        for p in plan.pipelines
    )


def _codec(name: str) -> str:
    return f" ({name})" if name != "raw" else ""


def _model_name(config: ServeConfig) -> str:
    if config.model_name:
        return config.model_name
    spec = config.source.spec
    base = spec.rsplit(":", 1)[-1] if ":" in spec else Path(spec).name.removesuffix(".pt2")
    return re.sub(r"[^A-Za-z0-9_.-]", "_", base) or "model"


def _read_nodes(config: ServeConfig) -> tuple[list[NodeSpec], str]:
    if config.nodes_file is None:
        if not config.nodes:
            raise InvalidSpec("--nodes or --nodes-file: expected the nodes to serve on")
        return list(config.nodes), ""
    try:
        text = config.nodes_file.read_text()
    except OSError as e:
        raise InvalidSpec(f"--nodes-file {config.nodes_file}: {e.strerror}") from None
    return parse_nodes_file(text, str(config.nodes_file)), text


def _server_hosts(host: str) -> list[str]:
    """The names curl may dial the front doors by: loopback, and the listening host (this
    machine's names when it listens on every address)."""
    bare = host.strip("[]")
    wanted = ["localhost", "127.0.0.1", "::1"]
    wanted += [socket.gethostname(), socket.getfqdn()] if bare in ("", "0.0.0.0", "::") else [bare]
    hosts: list[str] = []
    for name in wanted:
        with contextlib.suppress(InvalidSpec):  # a machine name no certificate can carry
            pki.san_for_host(name)
            if name.lower() not in hosts:
                hosts.append(name.lower())
    return hosts


class _TlsFiles:
    """The front doors' TLS files (see [Note: front door TLS]); removed by ``remove``."""

    def __init__(self, cluster: LocalCluster, config: ServeConfig) -> None:
        self.made_dir = config.tls_dir is None
        self.dir = pki.private_dir("amp4ec-serve-") if config.tls_dir is None else config.tls_dir
        if not self.made_dir:
            try:
                self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as e:
                raise InvalidSpec(f"--tls-dir {self.dir}: {e.strerror}") from None
        self.ca, self.cert, self.key = self.dir / "ca.crt", self.dir / "client.crt", self.dir / "client.key"
        self.written: list[Path] = []
        server = cluster.issue(FRONT_DOOR_IDENTITY, _server_hosts(config.host))
        user = cluster.issue(USER_IDENTITY)
        try:
            self._write(self.ca, server.ca_pem)
            self._write(self.dir / "server.crt", server.cert_pem)
            self._write(self.dir / "server.key", server.key_pem, private=True)
            self._write(self.cert, user.cert_pem)
            self._write(self.key, user.key_pem, private=True)
        except OSError as e:
            self.remove()
            raise InvalidSpec(f"--tls-dir {self.dir}: {e.strerror}") from None
        self.security = TransportSecurity.from_files(
            self.ca, self.dir / "server.crt", self.dir / "server.key"
        )

    def _write(self, path: Path, data: bytes, private: bool = False) -> None:
        self.written.append(path)
        if private:
            pki.write_private(path, data)
        else:
            path.write_bytes(data)

    def curl_flags(self, client_auth: bool) -> str:
        flags = f"--cacert {self.ca}"
        return f"{flags} --cert {self.cert} --key {self.key}" if client_auth else flags

    def remove(self) -> None:
        if self.made_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        for path in self.written:
            path.unlink(missing_ok=True)


async def _watch(config: ServeConfig, serving: _Serving, text: str) -> None:
    """Re-read the nodes file whenever its content changes (see [Note: nodes file])."""
    assert config.nodes_file is not None
    while True:
        await asyncio.sleep(config.poll_s)  # a polling period, not a synchronisation
        try:
            fresh = config.nodes_file.read_text()
        except OSError as e:
            fresh = text
            log.warning("--nodes-file %s: %s; serving on", config.nodes_file, e.strerror)
        if fresh == text:
            continue
        text = fresh
        try:
            await serving.reconfigure(parse_nodes_file(fresh, str(config.nodes_file)))
        except (Amp4ecError, grpc.aio.AioRpcError, OSError) as e:
            # A long-running server reports a change it could not apply and serves on.
            detail = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else str(e)
            serving.say(f"nodes file not applied, serving on what is left: {detail}")


async def serve(config: ServeConfig, say: Say, progress: Say | None = None) -> None:
    """Serve until cancelled (Ctrl-C, SIGTERM); everything started is stopped on the way out."""
    step = progress or (lambda text: None)
    nodes, text = _read_nodes(config)
    step("profiling the model")
    prepared = await asyncio.to_thread(
        prepare, config.source, config.compression.enabled, config.batching.profile_sizes()
    )
    example = prepared.loaded.example_inputs
    meta = model_meta(
        _model_name(config), prepared.loaded.module, example, prepared.expected, prepared.chain.batch_flexible
    )
    allowed = [m for m in (factory_module(config.source.spec),) if m]
    step("starting node agents")
    async with LocalCluster(
        nodes,
        config.limit_mode,
        allow_factories=allowed,
        secure=config.secure,
        cfs_period_us=config.cfs_period_us,
    ) as cluster:
        serving = _Serving(config, prepared, cluster, say)
        step("measuring node capacity")
        await serving.measure(list(cluster.agents))
        plan = serving.plan(list(cluster.agents))
        step("loading stages")
        await serving.deploy(plan)
        async with (
            Client(endpoints(plan, cluster.address), cluster.client_security) as client,
            Supervisor(cluster, client, plan, serving.plan, serving.deploy) as supervisor,
        ):
            serving.supervisor = supervisor
            door = FrontDoor(meta, ClientBackend(client), deadline_s=config.deadline_s)
            tls = _TlsFiles(cluster, config) if config.secure else None
            try:
                security = tls.security if tls else TransportSecurity.plaintext()
                authorise = (lambda peers: USER_IDENTITY in peers) if config.client_auth else None
                listeners = await listen.start(
                    door, config.host, config.http_port, config.grpc_port, security, authorise
                )
                try:
                    host = f"[{config.host}]" if ":" in config.host else config.host
                    base = f"{'https' if tls else 'http'}://{host}:{listeners.http_port}"
                    say(f"serving {meta.name} on {', '.join(cluster.agents)}: {describe(plan)}")
                    say(
                        f"  transport to the agents: {'mutual TLS' if config.secure else 'insecure'}; "
                        f"CPU limits: {cluster.limit_description}"
                    )
                    say(f"  v2 REST  {base}/v2/models/{meta.name}")
                    say(f"  v2 gRPC  {host}:{listeners.grpc_port} (inference.GRPCInferenceService)")
                    say(f"  batching {config.batching.describe()}")
                    if tls:
                        need = "required" if config.client_auth else "not required"
                        say(
                            f"  TLS:     CA {tls.ca}; client certificate {tls.cert}, key {tls.key} "
                            f"({need}); this run's, removed on exit"
                        )
                    else:
                        say("  TLS:     none (--insecure): plaintext, anyone who reaches the ports may call")
                    curl_tls = tls.curl_flags(config.client_auth) if tls else ""
                    shapes = [tuple(t.shape) for t in example]
                    say("  try:     " + curl_example(meta, base, shapes, curl_tls))
                    if config.nodes_file is not None:
                        say(f"  nodes:   edit {config.nodes_file} to add, remove or change nodes")
                    say("ready; Ctrl-C stops everything")
                    if config.nodes_file is None:
                        await asyncio.Event().wait()
                    else:
                        await _watch(config, serving, text)
                finally:
                    await listeners.stop()
            finally:
                if tls is not None:
                    tls.remove()
