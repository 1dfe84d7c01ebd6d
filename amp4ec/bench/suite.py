"""run_bench: every configuration in order, each model profiled once, failures recorded not raised."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from amp4ec.bench.batching import BATCHING, run_batching
from amp4ec.bench.configs import COMPRESSED, Configuration, configurations, cpu_budget
from amp4ec.bench.failover import run_failover
from amp4ec.bench.latency import run_latency
from amp4ec.bench.links import links_available
from amp4ec.bench.progress import ProgressSink
from amp4ec.bench.report import machine, summarise
from amp4ec.bench.results import BenchResults, ConfigurationResult, NotRun, StandardResult
from amp4ec.bench.runner import run_configuration, steps
from amp4ec.bench.tenants import run_multi_tenant
from amp4ec.errors import Amp4ecError
from amp4ec.local.cgroups import PERIOD_US
from amp4ec.slicing import ModelSource
from amp4ec.slicing.prepare import Prepared, prepare

__all__ = ["BenchOptions", "plan_configurations", "run_bench"]


@dataclass(frozen=True)
class BenchOptions:
    source: ModelSource
    quick: bool = False
    only: tuple[str, ...] = ()
    big_model: str = "vit_b_16"
    limit_mode: str = "auto"
    cfs_period_us: int = PERIOD_US
    """CFS period of the nodes' quotas (``--cfs-period``)."""
    cores: int | None = None
    """Cores the benchmark may use (default: this process's affinity)."""
    secure: bool = True
    """Mutual TLS on every hop (as ``amp4ec run``); False = everything plaintext (``--insecure``),
    which also leaves out the mTLS-against-insecure comparison."""
    command: str = "amp4ec bench"


def plan_configurations(options: BenchOptions) -> list[Configuration]:
    configs = configurations(
        options.source, quick=options.quick, only=options.only, big_model=options.big_model
    )
    return configs if options.secure else [replace(c, compare_transport=False) for c in configs]


async def run_bench(options: BenchOptions, progress: ProgressSink | None = None) -> BenchResults:
    sink = progress or ProgressSink()
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    configs = plan_configurations(options)
    budget = cpu_budget(options.cores)
    host = machine()
    done: list[ConfigurationResult] = []
    prepared: dict[tuple[ModelSource, bool, tuple[int, ...]], Prepared] = {}
    for config in configs:
        if config.links is not None and (why := links_available()) is not None:
            sink.note(f"{config.name}: skipped, slow links {why}")
            done.append(NotRun(config.name, "skipped", why))
            continue
        codecs = any(s in COMPRESSED for s in config.strategies)  # measured only where used
        sizes = BATCHING.profile_sizes() if config.batching else ()  # batch costs only where batched
        key = (config.source, codecs, sizes)
        if key not in prepared:
            sink.phase(f"profiling {config.source.spec}" + (" and its codecs" if codecs else ""))
            prepared[key] = await asyncio.to_thread(prepare, config.source, codecs, sizes)
        result: ConfigurationResult
        try:
            if config.faults:
                run = run_failover
            elif config.tenants:
                run = run_multi_tenant
            elif config.batching:
                run = run_batching
            else:
                run = run_latency if config.latency else run_configuration
            result = await run(
                config,
                prepared[key],
                budget,
                sink,
                limit_mode=options.limit_mode,
                cfs_period_us=options.cfs_period_us,
                secure=options.secure,
            )
        except Amp4ecError as e:
            sink.note(f"{config.name} failed: {e}")
            done.append(NotRun(config.name, "failed", str(e)))
            continue
        done.append(summarise(result) if isinstance(result, StandardResult) else result)
    return BenchResults(
        command=options.command,
        started=started_at,
        quick=options.quick,
        transport="mutual TLS" if options.secure else "insecure",
        machine=host,
        cpu_budget=budget,
        configurations=tuple(done),
        wall_s=time.perf_counter() - started,
    )


def total_steps(options: BenchOptions) -> int:
    return sum(steps(c) for c in plan_configurations(options))
