"""The benchmark's configurations (the paper's three, a model too big for any node, slow links).

[Note: inferred node sets] The paper gives the 3-node set (1.0/0.6/0.4 CPU, 1 GB/512 MB/
512 MB) and says the 2- and 4-node sets run against 1- and 3-CPU monoliths. We read those as
0.6+0.4 and 1.0+1.0+0.6+0.4: the node profiles it defines, summing to the monolith's CPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

from amp4ec.bench.names import CONFIGURATION_NAMES
from amp4ec.errors import InvalidSpec
from amp4ec.local.cluster import NodeSpec
from amp4ec.slicing import ModelSource

__all__ = [
    "ALL_CONFIGURATIONS",
    "COMPRESSED",
    "MATCHED",
    "STRATEGIES",
    "Configuration",
    "LinkShape",
    "Sizes",
    "configurations",
    "cpu_budget",
    "scale_nodes",
]

MiB = 1024 * 1024
MATCHED = "matched_monolith"
STRATEGIES = ("optimal", "paper", "equal", "memory", "replicate", "monolith", MATCHED)
"""Every strategy of the paper's configurations: the planner's six, plus the monolith on one
node with the configuration's total CPU (and memory), which the others are compared with."""
UNAWARE = "optimal_unaware"
"""The optimal plan made as if every link were loopback, deployed on the slow links."""
COMPRESSED: dict[str, tuple[tuple[str, ...], float]] = {
    "optimal_fp16": (("fp16",), 1e-3),
    "optimal_int8": (("fp16", "int8"), 2e-2),
}
"""The optimal plan with compression ``auto`` on the measured links: the codecs it may use and
the output error bound, issue 15's targets (fp16 ≤ 1e-3, int8 ≤ 2e-2 relative L2)."""
ALL_CONFIGURATIONS = CONFIGURATION_NAMES
CLIENT_HEADROOM = 0.2
"""Fraction of the machine's cores kept for the load generator (the client is a process too)."""


@dataclass(frozen=True)
class Sizes:
    """How many requests each measurement sends."""

    sequential: int
    saturation: int
    open_loop: int
    ideal: int
    concurrency_factors: tuple[int, ...]
    """Closed-loop levels tried, as multiples of the plan's stage count; the best is kept."""

    def scaled(self, factor: float) -> Sizes:
        def n(x: int) -> int:
            return max(3, math.ceil(x * factor))

        return replace(
            self,
            sequential=n(self.sequential),
            saturation=n(self.saturation),
            open_loop=n(self.open_loop),
            ideal=n(self.ideal),
        )


FULL = Sizes(sequential=20, saturation=120, open_loop=120, ideal=40, concurrency_factors=(1, 2))
BIG = Sizes(sequential=3, saturation=15, open_loop=15, ideal=6, concurrency_factors=(1, 2))
"""For the big and slow-links models: a forward takes 100–700 ms."""
QUICK = Sizes(sequential=4, saturation=16, open_loop=16, ideal=8, concurrency_factors=(1,))
BATCHING = Sizes(sequential=20, saturation=160, open_loop=300, ideal=40, concurrency_factors=(1, 2))
"""The batching configuration: more open-loop requests (its p95s are compared with a target)."""
BATCHING_QUICK = Sizes(sequential=4, saturation=24, open_loop=24, ideal=8, concurrency_factors=(1,))
FAILOVER = Sizes(sequential=0, saturation=1000, open_loop=0, ideal=0, concurrency_factors=(1,))
"""The failover configuration sends ``saturation`` requests per scenario, closed loop."""
FAILOVER_QUICK = replace(FAILOVER, saturation=400)
EVERY_FAULT = (("optimal", "kill"), ("optimal", "hang"), ("equal", "kill"), ("equal", "hang"))
QUICK_FAULTS = (("optimal", "kill"), ("equal", "hang"))
LATENCY = Sizes(sequential=20, saturation=12, open_loop=12, ideal=0, concurrency_factors=(1,))
"""The latency configuration: ``sequential`` single requests beside the fastest node alone."""
LATENCY_QUICK = Sizes(sequential=5, saturation=6, open_loop=6, ideal=0, concurrency_factors=(1,))
"""--quick: the fastest recovery (a replica killed) and the slowest (a hung split stage)."""


@dataclass(frozen=True)
class LinkShape:
    """Slow links between nodes: bandwidth (tc tbf) and one-way delay (a forwarding proxy)."""

    rate_mbit: float
    delay_ms: float


@dataclass(frozen=True)
class Configuration:
    name: str
    title: str
    source: ModelSource
    nodes: tuple[NodeSpec, ...]
    """As the paper asks, before scaling to this machine."""
    strategies: tuple[str, ...]
    sizes: Sizes
    links: LinkShape | None = None
    shard_memory_mb: int | None = None
    """Memory each node offers to shards beyond its agent's own (its cgroup limit is set to
    that plus the agent's resident memory and a margin once the agent is up)."""
    note: str = ""
    faults: tuple[tuple[str, str], ...] = ()
    """Failover scenarios: (strategy, ``kill`` or ``hang``): the strategy's plan with one node
    killed (SIGKILL) or hung (SIGSTOP) mid-run."""
    compare_transport: bool = False
    """Also measure the optimal and equal plans without TLS (``amp4ec.bench.transport``)."""
    tenants: int = 0
    """Deployments of the model sharing the nodes (``amp4ec.bench.tenants``); 0: one deployment."""
    latency: bool = False
    """One request's latency: the latency plan vs the fastest node alone (``amp4ec.bench.latency``)."""
    batching: bool = False
    """The batching comparison (``amp4ec.bench.batching``) instead of every strategy."""

    @property
    def total_cpu(self) -> float:
        return sum(n.cpu for n in self.nodes)


def _nodes(text: str) -> tuple[NodeSpec, ...]:
    parts = [p.split(":") for p in text.split(",")]
    return tuple(
        NodeSpec(f"node{i}", float(cpu), int(float(mem.removesuffix("M")) * MiB))
        for i, (cpu, mem) in enumerate(parts)
    )


def configurations(
    source: ModelSource,
    *,
    quick: bool = False,
    only: tuple[str, ...] = (),
    big_model: str = "vit_b_16",
    links_model: str = "resnet50",
) -> list[Configuration]:
    """The configurations to run, in order; ``quick`` = the standard one with few requests."""
    sizes = QUICK if quick else FULL
    big_sizes = QUICK if quick else BIG
    standard = "1.0:1024M,0.6:512M,0.4:512M"
    every = [
        Configuration(
            "standard",
            "3 nodes (1.0/0.6/0.4 CPU) vs a 2-CPU monolith",
            source,
            _nodes(standard),
            STRATEGIES,
            sizes,
            compare_transport=True,
        ),
        Configuration(
            "scale-down",
            "2 nodes (0.6/0.4 CPU) vs a 1-CPU monolith",
            source,
            _nodes("0.6:512M,0.4:512M"),
            STRATEGIES,
            sizes,
        ),
        Configuration(
            "scale-up",
            "4 nodes (1.0/1.0/0.6/0.4 CPU) vs a 3-CPU monolith",
            source,
            _nodes("1.0:1024M,1.0:1024M,0.6:512M,0.4:512M"),
            STRATEGIES,
            sizes,
        ),
        Configuration(
            "big-model",
            f"{big_model} on 3 nodes of 512 MB: no node holds the model",
            ModelSource(big_model, seed=source.seed),
            _nodes("1.0:512M,0.6:512M,0.4:512M"),
            ("optimal", "paper", "equal", "memory", "replicate", "monolith", MATCHED),
            big_sizes,
            note="ideal: each node's standalone throughput measured without its memory limit",
        ),
        Configuration(
            "slow-links",
            f"{links_model} split over 3 nodes joined by 20 Mbit/s links with 10 ms one-way delay",
            ModelSource(links_model, seed=source.seed),
            _nodes("1.0:1024M,0.6:1024M,0.4:1024M"),
            ("optimal", *COMPRESSED, UNAWARE, "paper", "equal", MATCHED),
            big_sizes,
            links=LinkShape(rate_mbit=20, delay_ms=10),
            shard_memory_mb=64,
            note=(
                "each node offers 64 MB to shards, so no node holds the model and a split is needed; "
                "client links are not shaped: the client stands beside the nodes, as a gateway"
            ),
        ),
        Configuration(
            "failover",
            "3 nodes (1.0/0.6/0.4 CPU), node1 killed or hung a third of the way through",
            source,
            _nodes(standard),
            ("optimal", "equal"),
            FAILOVER_QUICK if quick else FAILOVER,
            faults=QUICK_FAULTS if quick else EVERY_FAULT,
            note=(
                "optimal = whole-model replicas (survivors keep serving); equal = one 3-stage split, "
                "re-planned on the two survivors (new stages loaded)"
            ),
        ),
        Configuration(
            "multi-tenant",
            "4 deployments of the model share 3 nodes (1.0/0.6/0.4 CPU), each planned on its fair share",
            source,
            _nodes(standard),
            ("optimal",),
            sizes,
            tenants=4,
            note=(
                "each tenant planned in turn on min(its fair share, what is free) of each node, as the "
                "operator plans a deployment; every (tenant, node) stage in an agent of its own under a "
                "CPU quota of its share; all tenants driven at once, closed loop"
            ),
        ),
        Configuration(
            "batching",
            "3 nodes (1.0/0.6/0.4 CPU): dispatch and dynamic batching vs a batching 2-CPU monolith",
            source,
            _nodes(standard),
            ("optimal", MATCHED),
            BATCHING_QUICK if quick else BATCHING,
            batching=True,
        ),
    ]
    hundred = LinkShape(rate_mbit=100, delay_ms=1)  # 2 ms round trip
    for name, latency_source, shape in (
        ("latency", source, None),
        ("latency-resnet50", ModelSource("resnet50", seed=source.seed), None),
        ("latency-100mbit", source, hundred),
    ):
        links = "loopback links" if shape is None else "100 Mbit/s, 2 ms round trip between the nodes"
        every.append(
            Configuration(
                name,
                f"{latency_source.spec}: one request on 1.0/0.6/0.4 CPU, tiles vs the fastest node alone"
                + ("" if shape is None else " (100 Mbit/s links)"),
                latency_source,
                _nodes(standard),
                ("latency_objective", "layerwise", "fastest_node"),
                LATENCY_QUICK if quick else LATENCY,
                links=shape,
                latency=True,
                note=f"{links}; memory unlimited (every node may hold the tiled blocks)",
            )
        )
    if quick and not only:
        only = ("standard",)
    unknown = sorted(set(only) - set(ALL_CONFIGURATIONS))
    if unknown:
        raise InvalidSpec(
            f"--only: unknown configuration {unknown[0]!r}; expected one of {', '.join(ALL_CONFIGURATIONS)}"
        )
    return [c for c in every if not only or c.name in only]


def cpu_budget(cores: int | None = None) -> float:
    """CPU the nodes may share: the machine's cores less the client's headroom."""
    cores = cores or len(os.sched_getaffinity(0))
    return cores * (1 - CLIENT_HEADROOM)


def scale_nodes(config: Configuration, budget: float) -> tuple[tuple[NodeSpec, ...], float]:
    """The configuration's nodes with every CPU share scaled by one factor to fit ``budget``."""
    factor = min(1.0, budget / config.total_cpu)
    nodes = tuple(replace(n, cpu=round(n.cpu * factor, 4)) for n in config.nodes)
    return nodes, factor
