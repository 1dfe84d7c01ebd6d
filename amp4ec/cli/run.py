"""``amp4ec run``: local mode end to end, with a progress bar and a result table."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from amp4ec.cli.checks import check_at_least, check_writable_file, write_json
from amp4ec.cli.options import (
    batching_from,
    batching_options,
    cfs_period_option,
    compression_from,
    compression_options,
    cpu_limits_option,
    examples,
    model_options,
    planning_options,
    progress_bar,
    rate_from,
    source_from,
)
from amp4ec.nodes import AGENT_BASELINE_BYTES, check_faults, mib, parse_fault, parse_nodes, usable_memory

__all__ = ["run"]


@click.command(
    epilog=examples(
        "amp4ec run --model mobilenet_v2 --nodes 0.5:400M,0.3:300M,0.2:300M --requests 100",
        "amp4ec run --nodes 0.8,0.6 --strategy equal --fault node1:kill@3s --json result.json",
    )
)
@model_options
@click.option(
    "--nodes",
    "-n",
    default="1.0,0.6,0.4",
    show_default=True,
    help="nodes as CPU share[:memory limit], comma-separated, e.g. 1.0,0.6:512M (one agent each)",
)
@click.option("--requests", "-r", type=int, default=200, show_default=True, help="measured requests")
@click.option(
    "--concurrency", "-c", type=int, help="requests in flight (default: enough to fill the pipelines)"
)
@planning_options
@compression_options
@batching_options
@cpu_limits_option
@cfs_period_option
@click.option("--insecure", is_flag=True, help="plaintext gRPC (default: mutual TLS), for comparison")
@click.option(
    "--fault",
    "faults",
    multiple=True,
    metavar="NODE:kill|hang@SECONDS",
    help="inject a fault: SIGKILL (kill) or SIGSTOP (hang) NODE's agent this long after the measured "
    "requests start, e.g. node1:kill@5s (repeatable)",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="also write the results as JSON here",
)
def run(
    model: str,
    weights: str | None,
    seed: int,
    input_shape: str | None,
    nodes: str,
    requests: int,
    concurrency: int | None,
    strategy: str,
    objective: str,
    rate: float | None,
    tiles: bool,
    compression: str,
    max_output_error: float,
    batch: int,
    batch_delay_ms: float,
    cpu_limits: str,
    cfs_period: int,
    faults: tuple[str, ...],
    insecure: bool,
    json_path: Path | None,
) -> None:
    """Split a model over local node agents, serve requests through them and report.

    A dead or hung agent is noticed, the model re-planned on the survivors and the run goes
    on; the report lists every failover. Ctrl-C prints what was measured so far."""
    # Every flag is checked before torch is imported: a typo costs well under a second.
    check_at_least(requests, "--requests")
    check_at_least(concurrency, "--concurrency")
    check_writable_file(json_path, "--json")
    specs = tuple(parse_nodes(nodes))
    fault_specs = tuple(parse_fault(f) for f in faults)
    check_faults(fault_specs, specs)
    batching = batching_from(batch, batch_delay_ms)
    rate_rps = rate_from(objective, rate)
    source = source_from(model, weights, seed, input_shape)
    policy = compression_from(compression, max_output_error)

    from amp4ec.local import RunConfig
    from amp4ec.local import run as run_local

    config = RunConfig(
        source=source,
        nodes=specs,
        requests=requests,
        concurrency=concurrency,
        strategy=strategy,
        objective=objective,
        rate_rps=rate_rps,
        tiles=tiles,
        limit_mode=cpu_limits,
        cfs_period_us=cfs_period,
        faults=fault_specs,
        secure=not insecure,
        compression=policy,
        batching=batching,
    )
    console = Console()
    with progress_bar(console) as bar:
        task = bar.add_task("starting", total=None)

        def progress(phase: str, done: int, total: int) -> None:
            bar.update(task, description=phase, completed=done, total=total if phase == "requests" else None)

        report = asyncio.run(run_local(config, progress))
    print_report(console, report)
    if json_path is not None:
        write_json(json_path, report.to_json(), "--json")
        console.print(f"results written to {json_path}")
    if report.interrupted:
        raise SystemExit(130)


def print_report(console: Console, report) -> None:
    data = report.to_json()
    cpu = {n.name: n.cpu for n in report.nodes}
    table = Table(title=f"{report.model}: plan ({data['strategy']}, objective {data['objective']})")
    for col in ("pipeline", "node", "cpu", "blocks", "params MiB", "predicted ms", "measured ms", "sends"):
        table.add_column(col, justify="right" if col not in ("node", "sends") else "left")
    for row, stage, param_bytes in zip(data["plan"], data["stages"], report.stage_param_bytes, strict=True):
        table.add_row(
            str(row["pipeline"]),
            row["node"],
            f"{cpu[row['node']]:g}",
            f"{row['first_block']}–{row['last_block']}",
            f"{param_bytes / 2**20:.2f}",
            f"{stage['predicted_ms']:.1f}",
            _fmt(stage["measured_ms"]),
            row.get("out_codec", "raw"),
        )
    console.print(table)
    print_memory(console, report)
    results = Table(title="measured", show_header=False)
    results.add_column("metric")
    results.add_column("value", justify="right")
    results.add_row("requests (in flight)", f"{report.requests} ({report.concurrency})")
    results.add_row("answered / retried / failed", f"{report.answered} / {report.retried} / {report.failed}")
    results.add_row(
        "latency p50 / p95", f"{data['latency_ms']['p50']:.1f} / {data['latency_ms']['p95']:.1f} ms"
    )
    results.add_row(
        "throughput",
        f"{data['throughput_rps']:.2f} req/s (predicted {data['predicted']['throughput_rps']:.2f})",
    )
    results.add_row("max |distributed − monolith|", f"{data['max_abs_diff']:.2e}")
    squeeze = data["compression"]
    if squeeze["mode"] != "off":
        measured = squeeze["measured"]
        results.add_row(
            "compression",
            f"{squeeze['mode']}, output error bound {squeeze['max_output_error']:g} "
            f"(estimated {squeeze['estimated_output_error']:.2e})",
        )
        if measured:
            results.add_row(
                f"output error over {measured['inputs']} fixed inputs",
                f"relative L2 max {measured['rel_l2_max']:.2e} (mean {measured['rel_l2_mean']:.2e}), "
                f"top-1 agreement {measured['top1_agreement']:.0%}",
            )
    results.add_row("planning time", f"{data['planning_ms']:.2f} ms")
    results.add_row("bytes on the wire / request", f"{data['bytes_per_request'] / 1e6:.2f} MB")
    results.add_row("CPU limits", report.limits)
    results.add_row("transport", data["transport"])
    results.add_row("batching", report.batching.describe())
    console.print(results)
    print_failovers(console, report)
    if report.interrupted:
        console.print("[yellow]interrupted:[/] the figures cover the requests answered before Ctrl-C")
    for error in report.errors:
        console.print(f"[red]failed request:[/] {error}", highlight=False)
    skipped = [n.name for n in report.nodes if n.name not in {s.node for s in report.plan.stages}]
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    for note in report.plan.notes:
        console.print(f"note: {note}")
    if skipped and not report.plan.notes:
        console.print(f"note: nodes left out by the planner: {', '.join(skipped)}")


def print_memory(console: Console, report: Any) -> None:
    """What memory limits left each shard (see [Note: agent baseline]): why a model was split."""
    limited = [n for n in report.nodes if n.memory_bytes]
    if not limited:
        return
    first = report.plan.pipelines[0].stages
    model = sum(report.stage_param_bytes[: len(first)])  # the first pipeline holds the whole model
    offered = ", ".join(f"{n.name} {mib(usable_memory(n) or 0)}" for n in limited)
    console.print(
        f"memory: each node's limit less {mib(AGENT_BASELINE_BYTES)} for its agent is left to its shard "
        f"({offered}); {report.model}'s parameters take {model / 2**20:.1f} MiB",
        highlight=False,
    )


def print_failovers(console: Console, report) -> None:
    if not report.failovers:
        return
    table = Table(title="failovers (seconds since the measured requests started)")
    for col in ("node", "fault", "injected", "detected", "serving again", "recovery", "plan after"):
        table.add_column(col, justify="right" if col not in ("node", "fault", "plan after") else "left")
    for f in report.failovers:
        after = _pipelines(f.plan_after)
        table.add_row(
            f.node,
            f.kind,
            _secs(f.fault_s),
            _secs(f.detected_s),
            _secs(f.recovered_s),
            _secs(f.recovery_s),
            (after + (" (re-planned)" if f.replanned else " (survivors kept)")) if not f.error else f.error,
        )
    console.print(table)
    for f in report.failovers:
        console.print(f"{f.node} {f.kind}: {f.detail}", highlight=False)


def _pipelines(rows: list[dict]) -> str:
    """``node0 0–10 → node1 11–20 | node2 0–20``: stages in order, pipelines apart."""
    pipes: dict[int, list[str]] = {}
    for r in rows:
        pipes.setdefault(r["pipeline"], []).append(f"{r['node']} {r['first_block']}–{r['last_block']}")
    return " | ".join(" → ".join(stages) for stages in pipes.values()) or "none"


def _secs(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f} s"


def _fmt(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.1f}"
