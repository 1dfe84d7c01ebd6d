"""Command line of the node agent process: flags → AgentSettings (+ an optional stage), then serve."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from amp4ec.children import die_with_parent
from amp4ec.errors import Amp4ecError, InvalidSpec
from amp4ec.node_agent.capacity import cgroup_cpu_limit
from amp4ec.node_agent.model_cache_server import CacheOptions, CacheServer
from amp4ec.node_agent.monitor import Monitor
from amp4ec.node_agent.server import create_server
from amp4ec.node_agent.settings import AgentSettings
from amp4ec.wire.codec_names import CODECS
from amp4ec.wire.stage import StageConfig, parse_tile_phase
from amp4ec.wire.transport import TransportSecurity

__all__ = ["main", "parse_args"]


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(",") if d)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 1,3,224,224, got {text!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"expected positive sizes like 1,3,224,224, got {text!r}")
    return shape


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


_UNITS = {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


def _size(text: str) -> int:
    """Bytes, or a binary quantity as Kubernetes writes it (``20Gi``, ``512Mi``)."""
    number, unit = text.rstrip("KMGTi"), text[len(text.rstrip("KMGTi")) :]
    try:
        value = int(float(number) * _UNITS[unit])
    except (KeyError, ValueError):
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(
            f"expected a size like 20Gi, 512Mi or a number of bytes, got {text!r}"
        )
    return value


def _peer(text: str) -> tuple[str, str]:
    name, sep, target = text.partition("=")
    if not sep or not name or ":" not in target:
        raise argparse.ArgumentTypeError(f"expected NODE=HOST:PORT, got {text!r}")
    return name, target


def parse_args(
    argv: list[str] | None = None,
) -> tuple[AgentSettings, StageConfig | None, Path | None, Monitor | None]:
    p = argparse.ArgumentParser(prog="python -m amp4ec.node_agent", description=__doc__)
    p.add_argument("--node", default="node", help="node name the planner knows this agent by")
    p.add_argument("--host", default="127.0.0.1", help="address to bind ([::] in a Pod)")
    p.add_argument("--port", type=int, default=0, help="data-plane gRPC port, Shard (0 = any free port)")
    p.add_argument("--port-file", type=Path, help="write the bound data port here once serving")
    p.add_argument(
        "--control-port",
        type=int,
        help="control-plane gRPC port, NodeAgent/Monitor, operator only (default: none, 0 = any free port)",
    )
    p.add_argument("--control-port-file", type=Path, help="write the bound control port here once serving")
    p.add_argument("--health-port", type=int, help="plaintext gRPC health-only port (kubelet probes)")
    p.add_argument("--health-port-file", type=Path, help="write the bound health port here once serving")
    v2 = p.add_argument_group("Open Inference Protocol (v2) at the entry stage (see node_agent/entry.py)")
    v2.add_argument("--v2-http-port", type=int, help="v2 REST port (stage 0 only; 0 = any free port)")
    v2.add_argument("--v2-grpc-port", type=int, help="v2 gRPC port, inference.GRPCInferenceService")
    v2.add_argument("--v2-model-name", default="", help="the model's v2 name (default: from --model)")
    v2.add_argument("--v2-http-port-file", type=Path, help="write the bound v2 REST port here once serving")
    v2.add_argument("--v2-grpc-port-file", type=Path, help="write the bound v2 gRPC port here once serving")
    tls = p.add_argument_group("mutual TLS (required unless --insecure)")
    tls.add_argument("--tls-ca", type=Path, help="PEM CA certificate that peers must be signed by")
    tls.add_argument("--tls-cert", type=Path, help="PEM certificate of this agent (its identity)")
    tls.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    tls.add_argument("--insecure", action="store_true", help="plaintext, unauthenticated gRPC")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument("--cpu-limit", type=float, help="CPU cores (default: read the cgroup quota)")
    p.add_argument("--emulate-cpu", action="store_true", help="emulate --cpu-limit by idling (no cgroup)")
    p.add_argument("--threads", type=int, help="torch threads (default: floor(cpu limit), at least 1)")
    p.add_argument("--workers", type=int, default=1, help="forward threads serving requests side by side")
    p.add_argument("--window", type=int, default=16, help="in-flight requests per inbound stream")
    p.add_argument("--memory-bytes", type=int, help="memory to report (default: cgroup/MemAvailable)")
    lim = p.add_argument_group("bounds (see docs/architecture.md, Bounds)")
    d = AgentSettings()
    lim.add_argument("--max-streams", type=_positive, default=d.max_streams, help="data-plane calls at once")
    lim.add_argument(
        "--unread-timeout", type=float, default=d.unread_timeout_s, help="end a stream unread this many s"
    )
    lim.add_argument("--max-held-bytes", type=_positive, default=d.max_held_bytes)
    lim.add_argument("--max-batch", type=_positive, default=d.max_batch, help="largest dim 0 of a frame")
    lim.add_argument("--max-input-elements", type=_positive, default=d.max_input_elements)
    lim.add_argument("--max-profile-repeats", type=_positive, default=d.max_profile_repeats)
    lim.add_argument("--max-echo-bytes", type=_positive, default=d.max_echo_bytes)
    lim.add_argument("--max-message-bytes", type=_positive, default=d.max_message_bytes)
    lim.add_argument(
        "--allow-factory",
        action="append",
        default=[m for m in os.environ.get("AMP4EC_ALLOW_FACTORIES", "").split(",") if m],
        metavar="MODULE",
        help="module whose package.module:factory specs LoadStage/Profile may import (repeatable; "
        "env AMP4EC_ALLOW_FACTORIES, comma-separated; default none: a factory runs code)",
    )
    stage = p.add_argument_group("stage (optional: a range can also be loaded over gRPC)")
    stage.add_argument("--model", help="zoo name, .pt2 path or package.module:factory")
    stage.add_argument("--weights", help="local state_dict file (loaded with weights_only=True)")
    stage.add_argument("--seed", type=int, default=0)
    stage.add_argument("--input-shape", type=_shape)
    stage.add_argument("--first-block", type=int, default=0)
    stage.add_argument("--last-block", type=int, default=-1, help="inclusive; -1 = the last block")
    stage.add_argument("--next-hop", default="", help="host:port of the next shard")
    stage.add_argument(
        "--next-node", default="", help="the next shard's node, for errors (default: --next-hop)"
    )
    stage.add_argument("--stage", type=int, default=0, help="index of the stage in its pipeline")
    stage.add_argument(
        "--batch", type=_positive, default=1, help="dynamic batching: most waiting requests per forward"
    )
    stage.add_argument(
        "--batch-delay-ms",
        type=float,
        default=0.0,
        help="how long a batch's first request may wait for more (default 0: only what waits)",
    )
    stage.add_argument("--next-hop-identity", default="", help="identity the next shard must present (mTLS)")
    stage.add_argument(
        "--accept-from",
        action="append",
        default=[],
        help="identity allowed to send this stage frames (repeatable; mTLS)",
    )
    stage.add_argument(
        "--output-codec",
        choices=list(CODECS),
        default="raw",
        help="how the stage encodes what it sends (its outputs, or its answer when last); "
        "the planner chooses per cut",
    )
    stage.add_argument(
        "--tile-phase",
        action="append",
        default=[],
        help="blocks of the stage run as row tiles over several agents, as JSON "
        '{"first", "last", "tiles": [{"node", "address", "identity", "rows": [start, stop]}]} '
        "(repeatable, in block order; the operator writes them)",
    )
    stage.add_argument(
        "--tile-only",
        action="store_true",
        help="a tile stage: answer each frame with this agent's rows of the phase it names",
    )
    mon = p.add_argument_group("monitor role (one per node: capacity metrics, link probes, profiling)")
    mon.add_argument(
        "--monitor-interval",
        type=float,
        help="run the monitor role, refreshing capacity metrics every this many seconds",
    )
    mon.add_argument(
        "--peer",
        type=_peer,
        action="append",
        default=[],
        help="NODE=HOST:PORT of a peer monitor to probe links to (repeatable)",
    )
    mon.add_argument(
        "--profiler",
        action="store_true",
        help="the profiler role: serve Monitor.Profile (models loaded here) on the control port and "
        "nothing else (the operator's short-lived Pod in a deployment's namespace)",
    )
    mon.add_argument(
        "--capacity-override",
        type=Path,
        help="JSON file whose keys replace measured capacity (re-read every refresh)",
    )
    cache = p.add_argument_group("the node-wide model cache (monitor role; see node_agent/model_cache.py)")
    cache.add_argument("--model-cache", type=Path, metavar="DIR", help="serve ModelCache from this directory")
    cache.add_argument("--model-cache-size", type=_size, default="20Gi", help="most bytes kept (LRU beyond)")
    cache.add_argument("--model-cache-port", type=int, default=50054, help="its gRPC port (mutual TLS)")
    cache.add_argument("--model-cache-port-file", type=Path, help="write the bound cache port here")
    cache.add_argument(
        "--model-cache-wait",
        type=float,
        default=600.0,
        help="seconds a caller waits for another's upload of the same file before fetching for itself",
    )
    a = p.parse_args(argv)
    try:
        if a.insecure:
            security = TransportSecurity.plaintext()
        else:
            security = TransportSecurity.from_files(a.tls_ca, a.tls_cert, a.tls_key)
    except InvalidSpec as exc:
        p.error(str(exc))
    settings = AgentSettings(
        node=a.node,
        host=a.host,
        port=a.port,
        control_port=a.control_port,
        health_port=a.health_port,
        v2_http_port=a.v2_http_port,
        v2_grpc_port=a.v2_grpc_port,
        v2_model_name=a.v2_model_name,
        security=security,
        metrics_port=a.metrics_port,
        cpu_limit=a.cpu_limit,
        emulate_cpu=a.emulate_cpu,
        threads=a.threads,
        workers=a.workers,
        window=a.window,
        memory_bytes=a.memory_bytes,
        max_streams=a.max_streams,
        unread_timeout_s=a.unread_timeout,
        max_held_bytes=a.max_held_bytes,
        max_batch=a.max_batch,
        max_input_elements=a.max_input_elements,
        max_profile_repeats=a.max_profile_repeats,
        max_echo_bytes=a.max_echo_bytes,
        max_message_bytes=a.max_message_bytes,
        allowed_factories=tuple(a.allow_factory),
    )
    if (a.v2_http_port is None) != (a.v2_grpc_port is None):
        p.error("--v2-http-port and --v2-grpc-port: the v2 front door needs both")
    if a.v2_http_port is not None and (not a.model or a.stage != 0):
        p.error("--v2-http-port: only an entry stage (--model, --stage 0) serves v2")
    config = None
    try:
        phases = tuple(parse_tile_phase(text) for text in a.tile_phase)
    except InvalidSpec as exc:
        p.error(str(exc))
    if a.model:
        config = StageConfig(
            model=a.model,
            first_block=a.first_block,
            last_block=a.last_block,
            next_hop=a.next_hop,
            next_node=a.next_node,
            stage=a.stage,
            weights=a.weights,
            seed=a.seed,
            input_shape=a.input_shape,
            next_hop_identity=a.next_hop_identity,
            accept_from=tuple(a.accept_from),
            output_codec=a.output_codec,
            max_batch_requests=a.batch,
            max_queue_delay_ms=a.batch_delay_ms,
            tile_phases=phases,
            tile_only=a.tile_only,
        )
    if a.profiler:
        if a.control_port is None:
            p.error("--control-port: the profiler serves Monitor.Profile on the control port")
        if not a.model or a.monitor_interval is not None:
            p.error("--profiler: profiles the one --model it is given (and is no monitor)")
    monitor = None
    if a.monitor_interval is not None:
        if a.control_port is None:
            p.error("--control-port: the monitor role serves Monitor.Profile on the control port")
        if a.monitor_interval <= 0:
            p.error(f"--monitor-interval: expected a positive number of seconds, got {a.monitor_interval}")
        if a.model_cache is not None and a.insecure:
            p.error("--model-cache: entries are keyed by the caller's certificate (needs mutual TLS)")
        cache_options = None
        if a.model_cache is not None:
            cache_options = CacheOptions(
                a.model_cache, a.model_cache_size, a.model_cache_port, a.model_cache_wait
            )
        monitor = Monitor(
            settings,
            cpu_limit=a.cpu_limit if a.cpu_limit is not None else cgroup_cpu_limit(),
            interval=a.monitor_interval,
            peers=dict(a.peer),
            override=a.capacity_override,
            model_cache=cache_options,
        )
    elif a.model_cache is not None:
        p.error("--model-cache: only the monitor role (--monitor-interval) keeps the node's model cache")
    files = PortFiles(
        a.port_file,
        a.control_port_file,
        a.health_port_file,
        a.v2_http_port_file,
        a.v2_grpc_port_file,
        a.model_cache_port_file,
        profiler=a.profiler,
    )
    return settings, config, files, monitor


@dataclass(frozen=True)
class PortFiles:
    """Where to write the bound ports once serving (None: do not); ``profiler``: the role."""

    data: Path | None = None
    control: Path | None = None
    health: Path | None = None
    v2_http: Path | None = None
    v2_grpc: Path | None = None
    model_cache: Path | None = None
    profiler: bool = False
    """The profiler role: ``config`` names the one model to profile, not a stage to load."""


def _write_port(path: Path | None, port: int | None) -> None:
    if path is not None and port is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(path)  # atomic: a reader never sees a half-written port


async def serve(
    settings: AgentSettings,
    config: StageConfig | None,
    port_files: PortFiles,
    monitor: Monitor | None = None,
) -> None:
    if port_files.profiler:
        assert config is not None  # parse_args requires --model with --profiler
        await _serve_profiler(settings, config, port_files)
        return
    agent = await create_server(settings)
    if config is not None:
        await agent.load(config)
    cache = None
    if monitor is not None:
        monitor.start(agent)
        if monitor.model_cache is not None:
            try:
                cache = CacheServer.create(settings, monitor.model_cache)
            except OSError as exc:  # the cache saves fetches; the node's metrics are the monitor's job
                logging.getLogger("amp4ec.node_agent").error(
                    "--model-cache %s: %s; serving without the model cache (Pods fetch for themselves)",
                    monitor.model_cache.root,
                    exc,
                )
    if settings.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.host.strip("[]") or "0.0.0.0")
    v2 = None
    if settings.v2_http_port is not None:
        from amp4ec.node_agent.entry import serve_v2  # aiohttp: only where v2 is served

        v2 = await serve_v2(agent, settings)
    await agent.start()
    if cache is not None:
        await cache.start()
        _write_port(port_files.model_cache, cache.port)
    # The data port last: a reader of the data port file may then read them all.
    if v2 is not None:
        _write_port(port_files.v2_http, v2.http_port)
        _write_port(port_files.v2_grpc, v2.grpc_port)
    _write_port(port_files.control, agent.control_port)
    _write_port(port_files.health, agent.health_port)
    _write_port(port_files.data, agent.port)
    logging.getLogger("amp4ec.node_agent").info("node agent %s serving on port %d", settings.node, agent.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if monitor is not None:
        await monitor.stop()
    if cache is not None:
        await cache.stop(settings.grace_s)
    if v2 is not None:
        await v2.stop(settings.grace_s)
    await agent.stop(settings.grace_s)


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _serve_profiler(settings: AgentSettings, config: StageConfig, port_files: PortFiles) -> None:
    from amp4ec.node_agent.profiler import create_profiler
    from amp4ec.wire.v1 import agent_pb2

    model = agent_pb2.StageSpec(
        model=config.model,
        weights=config.weights or "",
        seed=config.seed,
        input_shape=list(config.input_shape or ()),
    )
    profiler = await create_profiler(settings, model)
    await profiler.start()
    _write_port(port_files.health, profiler.health_port)
    _write_port(port_files.control, profiler.control_port)
    logging.getLogger("amp4ec.node_agent").info("profiler serving on port %d", profiler.control_port)
    await _until_signalled()
    await profiler.stop(settings.grace_s)


def main(argv: list[str] | None = None) -> None:
    die_with_parent()  # a no-op unless a local cluster started this agent
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings, config, port_files, monitor = parse_args(argv)
    try:
        asyncio.run(serve(settings, config, port_files, monitor))
    except Amp4ecError as exc:
        print(f"amp4ec node agent: {exc}", file=sys.stderr)
        sys.exit(2)
