"""``amp4ec plan``: profile a model here and print the plan a strategy makes for given nodes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from amp4ec.cli.checks import check_writable_file, write_json
from amp4ec.cli.options import (
    batching_from,
    batching_options,
    compression_from,
    compression_options,
    examples,
    model_options,
    planning_options,
    rate_from,
    source_from,
)
from amp4ec.errors import InvalidSpec
from amp4ec.nodes import check_node_count, parse_nodes, usable_memory

__all__ = ["plan"]

LOAD = 0.9
"""The load ``amp4ec plan`` predicts latency at, as a fraction of the plan's throughput."""


@click.command(
    epilog=examples(
        "amp4ec plan --model mobilenet_v2 --nodes 1.0:1G,0.6:512M,0.4:512M --json plan.json",
        "amp4ec plan --model vit_b_16 --nodes 0.5:512M,0.5:512M,0.5:512M   # no node holds it",
        "amp4ec plan --model resnet50 --nodes 1.0:350M,0.6:350M,0.4:350M --bandwidth-mbps 20 "
        "--compression auto",
    )
)
@model_options
@click.option(
    "--nodes",
    "-n",
    default="1.0,0.6,0.4",
    show_default=True,
    help="nodes as CPU share[:memory limit in MiB/GiB], comma-separated, e.g. 1.0:1G,0.6:512M,0.4:512M",
)
@planning_options
@compression_options
@batching_options
@click.option(
    "--bandwidth-mbps",
    type=float,
    default=1000.0,
    show_default=True,
    help="bandwidth of every link, megabits per second",
)
@click.option("--rtt-ms", type=float, default=0.2, show_default=True, help="round-trip time of every link")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="also write the plan as JSON here",
)
def plan(
    model: str,
    weights: str | None,
    seed: int,
    input_shape: str | None,
    nodes: str,
    objective: str,
    rate: float | None,
    tiles: bool,
    strategy: str,
    compression: str,
    max_output_error: float,
    batch: int,
    batch_delay_ms: float,
    bandwidth_mbps: float,
    rtt_ms: float,
    json_path: Path | None,
) -> None:
    """Plan a model over nodes without running it (block times measured on this machine)."""
    if not bandwidth_mbps > 0 or not rtt_ms >= 0:
        raise InvalidSpec("--bandwidth-mbps must be > 0 and --rtt-ms ≥ 0")
    specs = parse_nodes(nodes)
    rate_rps = rate_from(objective, rate)
    batching = batching_from(batch, batch_delay_ms)
    check_writable_file(json_path, "--json")
    source = source_from(model, weights, seed, input_shape)
    policy = compression_from(compression, max_output_error)

    from amp4ec.plan_timer import timed_plan
    from amp4ec.planner.types import Link, NodeCapacity
    from amp4ec.slicing.prepare import compression_options as plan_compression
    from amp4ec.slicing.prepare import prepare

    console = Console()
    with console.status("profiling the model" + (" and its codecs" if policy.enabled else "")):
        prepared = prepare(source, codecs=policy.enabled, batch_sizes=batching.profile_sizes())
    check_node_count(len(specs), len(prepared.chain), model)
    # The memory a shard may use: the limit less the agent's own (see [Note: agent baseline]).
    capacities = [NodeCapacity(name=n.name, cpu=n.cpu, memory_bytes=usable_memory(n) or 2**62) for n in specs]
    link = Link("*", "*", rtt_ms=rtt_ms, bandwidth_bytes_per_s=bandwidth_mbps * 1e6 / 8)
    result, planning_ms = timed_plan(
        prepared.profiles,
        capacities,
        objective=objective,
        rate_rps=rate_rps,
        strategy=strategy,
        tiles=tiles,
        input_bytes=prepared.chain.input_bytes,
        default_link=link,
        max_batch=batching.max_requests,
        **plan_compression(policy, prepared),
    )
    data = plan_json(result, planning_ms, prepared.chain.names)
    data["compression"] = {"mode": policy.mode, "max_output_error": policy.max_error}
    data["batching"] = dataclasses.asdict(batching)
    data["blocks"] = [dataclasses.asdict(b) for b in prepared.profiles]  # what the plan was made from
    print_plan(console, data, {n.name: n.cpu for n in specs}, model)
    if json_path is not None:
        write_json(json_path, data, "--json")
        console.print(f"plan written to {json_path}")


def plan_json(result: Any, planning_ms: float, block_names: list[str]) -> dict[str, Any]:
    from amp4ec.planner.batching import saturation_rps
    from amp4ec.planner.load import latency_under_load

    loaded = latency_under_load(result, LOAD * result.predicted.throughput_rps)
    return {
        "strategy": result.strategy,
        "objective": result.objective,
        "plan": [
            {
                **row,
                "blocks": f"{block_names[s.first_block]}..{block_names[s.last_block]}",
                "compute_ms": s.compute_ms,
                "transfer_ms": s.transfer_ms,
                "codec_ms": s.codec_ms,
                "out_codec": s.out_codec,
                "memory_mib": s.memory_bytes / 2**20,
                **({"tiles": [_tiles_json(g) for g in s.tiles]} if s.tiles else {}),
            }
            for row, s in zip(result.rows(), result.stages, strict=True)
        ],
        "predicted": {
            "stage_ms": list(result.predicted.stage_ms),
            "bottleneck_ms": result.predicted.bottleneck_ms,
            "latency_ms": result.predicted.latency_ms,
            "throughput_rps": result.predicted.throughput_rps,
            "output_error": result.predicted.output_error,
            "saturation_rps": saturation_rps(result),
            "under_load": {
                "rate_rps": loaded.rate_rps,
                "p50_ms": loaded.p50_ms,
                "p95_ms": loaded.p95_ms,
                "pipeline_shares": list(loaded.shares),
                "stage_batches": list(loaded.batches),
            },
        },
        "planning_ms": planning_ms,
        "notes": list(result.notes),
    }


def _tiles_json(group: Any) -> dict[str, Any]:
    return {
        "first_block": group.first_block,
        "last_block": group.last_block,
        "nodes": list(group.nodes),
        "rows": [list(r) for r in group.rows],
        "tile_ms": list(group.tile_ms),
    }


def print_plan(console: Console, data: dict[str, Any], cpu: dict[str, float], model: str) -> None:
    table = Table(title=f"{model}: {data['strategy']} plan, objective {data['objective']}")
    cols = ("pipeline", "node", "cpu", "blocks", "compute ms", "transfer ms", "stage ms", "memory MiB")
    for col in (*cols, "sends"):
        table.add_column(col, justify="left" if col in ("node", "blocks", "sends") else "right")
    bottleneck = data["predicted"]["bottleneck_ms"]
    for row, stage_ms in zip(data["plan"], data["predicted"]["stage_ms"], strict=True):
        mark = " ◀" if abs(stage_ms - bottleneck) < 1e-9 else ""
        table.add_row(
            str(row["pipeline"]),
            row["node"],
            f"{cpu[row['node']]:g}",
            f"{row['first_block']}–{row['last_block']}",
            f"{row['compute_ms']:.2f}",
            f"{row['transfer_ms']:.2f}",
            f"{stage_ms:.2f}{mark}",
            f"{row['memory_mib']:.1f}",
            row["out_codec"],
        )
    console.print(table)
    for row in data["plan"]:
        for t in row.get("tiles", []):
            parts = ", ".join(
                f"{n} rows {a}–{b - 1} ({ms:.2f} ms)"
                for n, (a, b), ms in zip(t["nodes"], t["rows"], t["tile_ms"], strict=True)
            )
            console.print(
                f"tiled on {row['node']}: blocks {t['first_block']}–{t['last_block']} as row tiles: {parts}"
            )
        if row.get("tiles"):
            console.print(f"  (the stage's other blocks run on {row['node']} alone)")
    p = data["predicted"]
    console.print(
        f"bottleneck {p['bottleneck_ms']:.2f} ms · latency {p['latency_ms']:.2f} ms · "
        f"throughput {p['throughput_rps']:.2f} req/s · planning {data['planning_ms']:.3f} ms"
    )
    policy = data.get("compression")
    if policy and policy["mode"] != "off":
        console.print(
            f"compression {policy['mode']}: estimated output error {p['output_error']:.2e} "
            f"(relative L2, bound {policy['max_output_error']:g}); stage ms include the codecs' CPU"
        )
    u = p["under_load"]
    console.print(
        f"at {LOAD:.0%} of that throughput ({u['rate_rps']:.1f} req/s, each request to the pipeline "
        f"expected to answer first): latency p50 {u['p50_ms']:.1f} / p95 {u['p95_ms']:.1f} ms"
    )
    if "batching" in data:
        from amp4ec.wire.stage import Batching  # protobuf: not in a bare install's --help path

        console.print(f"batching: {Batching(**data['batching']).describe()}")
        if data["batching"]["max_requests"] > 1:
            batches = " / ".join(f"{b:.2f}" for b in u["stage_batches"])
            console.print(
                f"  with it: saturation {p['saturation_rps']:.2f} req/s (every stage at its largest "
                f"batch), mean batch per stage at {LOAD:.0%} load {batches}"
            )
    for note in data["notes"]:
        console.print(f"note: {note}")
