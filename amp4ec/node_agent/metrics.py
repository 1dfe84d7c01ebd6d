"""The node agent's Prometheus metrics (one registry per process, served on --metrics-port):
the stages' histograms and counters, and the monitor role's node and link gauges."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "BATCH_SIZE",
    "BYTES_SAVED",
    "CAPACITY",
    "LINK_BANDWIDTH",
    "LINK_RTT",
    "MODEL_CACHE_BYTES",
    "MODEL_CACHE_REQUESTS",
    "NODE_CPU_LIMIT",
    "NODE_MEMORY",
    "NODE_OVERHEAD",
    "NODE_WORKLOAD",
    "PHASE_SECONDS",
    "REQUESTS",
    "REQUEST_SECONDS",
]

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

PHASE_SECONDS = Histogram(
    "amp4ec_stage_phase_seconds",
    "Time one request spends in each phase of a stage (queue, decode, forward, encode).",
    ["node", "phase"],
    buckets=_BUCKETS,
)
REQUESTS = Counter(
    "amp4ec_stage_requests_total",
    "Requests a stage answered, by gRPC status code name.",
    ["node", "code"],
)
REQUEST_SECONDS = Histogram(
    "amp4ec_request_seconds",
    "End to end, observed by the entry stage (stage 0) only: from a request's arrival to its"
    " answer, through every later stage, by gRPC status code name.",
    ["node", "code"],
    buckets=(*_BUCKETS, 10.0),
)
"""Its ``_count`` is the pipeline's answered requests: what the operator's ``status.measured`` reads."""
CAPACITY = Gauge(
    "amp4ec_node_capacity",
    "What this node offers: cpu_limit (cores), workload_ms, memory_available_bytes, load, "
    "request_overhead_ms (CPU ms a request costs a stage here beyond its blocks).",
    ["node", "resource"],
)
BYTES_SAVED = Counter(
    "amp4ec_stage_bytes_saved_total",
    "Bytes a stage's output codec kept off the wire: the raw float32 size of what it sent less"
    " the encoded size, by codec (fp16, int8).",
    ["node", "codec"],
)
BATCH_SIZE = Histogram(
    "amp4ec_stage_batch_size",
    "Requests one forward of a stage ran together (dynamic batching; 1 = alone).",
    ["node"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
)
"""``rate(_sum) / rate(_count)`` is the mean batch; ``_count`` the forwards run."""

# The monitor role's gauges (monitor.py): what no standard exporter gives, per node and link.
NODE_CPU_LIMIT = Gauge("amp4ec_node_cpu_limit_cores", "CPU cores a shard on this node may use.", ["node"])
NODE_WORKLOAD = Gauge(
    "amp4ec_node_workload_ms",
    "Milliseconds this node takes for amp4ec's fixed reference workload on one thread (lower is faster).",
    ["node"],
)
NODE_OVERHEAD = Gauge(
    "amp4ec_node_request_overhead_ms",
    "CPU milliseconds one request costs a stage on this node beyond its blocks (gRPC, codec, relaying).",
    ["node"],
)
NODE_MEMORY = Gauge(
    "amp4ec_node_memory_available_bytes", "Memory a shard may still use on this node.", ["node"]
)
LINK_RTT = Gauge("amp4ec_link_rtt_seconds", "Round-trip time of a small gRPC echo to a peer.", ["src", "dst"])
LINK_BANDWIDTH = Gauge(
    "amp4ec_link_bandwidth_bytes_per_second",
    "Bytes per second of a large gRPC echo to a peer.",
    ["src", "dst"],
)
MODEL_CACHE_REQUESTS = Counter(
    "amp4ec_model_cache_requests_total",
    "ModelCache.Fetch calls of the monitor's node-wide model cache, by result: hit; fill (a miss"
    " this caller fills); wait (for another caller's fill of the same file, before a hit or a"
    " fill); timeout (waited too long, fetches for itself); stored; refused (an upload not kept).",
    ["node", "result"],
)
MODEL_CACHE_BYTES = Gauge(
    "amp4ec_model_cache_bytes", "Bytes of model files the node's cache holds.", ["node"]
)
