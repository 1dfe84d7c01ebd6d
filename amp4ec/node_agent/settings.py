"""AgentSettings: one typed settings object per node agent process, built once at the edge."""

from __future__ import annotations

from dataclasses import dataclass, field

from amp4ec.wire.liveness import KEEPALIVE_OPTIONS
from amp4ec.wire.transport import TransportSecurity

__all__ = ["AgentSettings"]

MiB = 1024 * 1024


@dataclass(frozen=True)
class AgentSettings:
    """How a node agent serves; every field documented with its unit and why it defaults so."""

    node: str = "node"
    """Name the planner knows this node by (the Kubernetes node name in a cluster)."""
    host: str = "127.0.0.1"
    """Address to bind. 127.0.0.1 in local mode; ``[::]`` in a Pod so peers can reach it."""
    port: int = 0
    """Data-plane gRPC port (the Shard service); 0 picks a free one (tests and local mode read it back)."""
    control_port: int | None = None
    """Control-plane gRPC port (NodeAgent, Monitor), authorised separately: only the operator
    (or the local supervisor) may use it. None serves no control plane: a shard Pod takes its
    stage from its arguments and nothing on the network can re-target it."""
    health_port: int | None = None
    """Plaintext port serving only gRPC health (for the kubelet, which cannot present a
    certificate); None serves none. Health on the data and control ports needs mutual TLS."""
    v2_http_port: int | None = None
    """The entry stage's Open Inference Protocol (v2) REST port; None serves none (see
    ``node_agent/entry.py``). Served with ``v2_grpc_port``, under this agent's TLS."""
    v2_grpc_port: int | None = None
    """The entry stage's v2 gRPC port (``inference.GRPCInferenceService``)."""
    v2_model_name: str = ""
    """The model's name in v2 paths (``/v2/models/<name>``): the deployment's name in a cluster."""
    security: TransportSecurity = field(default_factory=TransportSecurity.plaintext)
    """Mutual TLS material, or insecure. The agent's command line has no default: it needs
    certificates or an explicit --insecure; this default serves in-process tests."""
    metrics_port: int | None = None
    """Port of the Prometheus /metrics endpoint; None serves none."""
    cpu_limit: float | None = None
    """CPU limit in cores when it cannot be read from the cgroup (None = detect)."""
    emulate_cpu: bool = False
    """Emulate ``cpu_limit`` by idling after each forward (duty cycle) where no cgroup quota
    can be set. Honest for throughput, coarser than a quota for latency; the runner says
    which one it used."""
    threads: int | None = None
    """torch intra-op threads; None = floor(cpu_limit), at least 1. One thread under a
    fractional quota: more threads only burn the quota on synchronisation."""
    workers: int = 1
    """Forward threads running requests side by side. One keeps arrival order and suits a
    share of one core or less; a node of several cores serving a whole small model at batch
    1 uses them better with a worker per core than with intra-op threads."""
    window: int = 16
    """Requests one inbound stream may have in this stage and beyond it at once. When it is
    full the agent stops reading the stream, and gRPC flow control pushes back upstream."""
    max_message_bytes: int = 64 * MiB
    """gRPC send/receive limit on both ends; an activation larger than this is refused
    (RESOURCE_EXHAUSTED). 64 MiB holds a batch of 64 ImageNet inputs (38.5 MB)."""
    max_streams: int = 64
    """Calls (streams included) the agent serves at once; more are refused RESOURCE_EXHAUSTED.
    With ``window`` it bounds the answers held for callers: max_streams x window."""
    max_held_bytes: int = 128 * MiB
    """Bytes of requests in work and answers not yet read the agent holds for all callers
    together (protobuf sizes); past it the longest-stalled stream is ended, or new requests
    are refused RESOURCE_EXHAUSTED (see [Note: held bytes])."""
    unread_timeout_s: float = 30.0
    """A stream whose caller has not taken an answer for this long is ended (its window's
    answers freed), so a caller that stops reading cannot hold memory for ever."""
    max_batch: int = 64
    """Largest dim 0 of a frame's tensors: a batch-flexible stage would otherwise run any
    batch a caller sends (batch 400 of MobileNetV2 needs ~6 GB of activations)."""
    max_input_elements: int = 1 << 24
    """Largest element count of an ``input_shape`` in LoadStage and Monitor.Profile (16.8 M:
    a 3x2048x2048 image; [1, 3, 4096, 4096] made the profiler peak at 6.35 GB)."""
    max_profile_repeats: int = 100
    """Largest ``repeats`` of Monitor.Profile (timed runs per block)."""
    max_echo_bytes: int = 4 * MiB
    """Largest Echo payload and reply (link probes use 1 MiB)."""
    max_request_id_chars: int = 128
    """Longest request id a frame may carry (it is copied into every answer and log line)."""
    allowed_factories: tuple[str, ...] = ()
    """Modules whose ``package.module:factory`` specs LoadStage and Profile may import; a
    factory is code execution, so none by default (see ``amp4ec.slicing.sources``)."""
    grace_s: float = 5.0
    """Seconds in-flight requests get to finish on SIGTERM before the server stops."""
    memory_bytes: int | None = None
    """Memory available to shards, reported to the planner (None = read from the cgroup
    limit or the machine's available memory)."""

    def grpc_options(self) -> list[tuple[str, int]]:
        """Server and next-hop channel options: message limits and keepalive (see
        [Note: keepalive] in amp4ec.wire.liveness)."""
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            *KEEPALIVE_OPTIONS,
        ]

    def server_options(self) -> list[tuple[str, int]]:
        # HTTP/2 streams per connection: a stream ended for not reading stays in gRPC core
        # until its caller reads or disconnects, so cap how many one connection can leave.
        return [*self.grpc_options(), ("grpc.max_concurrent_streams", self.max_streams)]
