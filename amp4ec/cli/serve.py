"""``amp4ec serve``: local mode that stays up behind the Open Inference Protocol (v2)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click
from rich.console import Console

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
    rate_from,
    source_from,
)

__all__ = ["serve"]


@click.command(
    epilog=examples(
        "amp4ec serve --model mobilenet_v2 --nodes 1.0,0.6,0.4",
        "amp4ec serve --nodes-file nodes.txt --http-port 8000 --grpc-port 8001   # lines: NAME CPU[:MEMORY]",
        "amp4ec serve --tls-dir tls   # curl --cacert tls/ca.crt --cert tls/client.crt --key tls/client.key",
    )
)
@model_options
@click.option(
    "--nodes",
    "-n",
    default="1.0,0.6,0.4",
    show_default=True,
    help="fixed nodes as CPU share[:memory limit], comma-separated (ignored with --nodes-file)",
)
@click.option(
    "--nodes-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="nodes as 'NAME CPU[:MEMORY]' lines, re-read on change: add, remove or change a node and "
    "the model is re-planned while serving",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="address the v2 front doors listen on")
@click.option("--http-port", type=int, default=8000, show_default=True, help="v2 REST port (0: any free)")
@click.option("--grpc-port", type=int, default=8001, show_default=True, help="v2 gRPC port (0: any free)")
@click.option("--model-name", default="", help="the v2 model name (default: from --model, e.g. mobilenet_v2)")
@planning_options
@compression_options
@batching_options
@cpu_limits_option
@cfs_period_option
@click.option(
    "--insecure",
    is_flag=True,
    help="plaintext everywhere: to the agents and on the v2 front doors (default: TLS, mutual to the agents)",
)
@click.option(
    "--client-auth",
    type=click.Choice(["required", "none"]),
    default="required",
    show_default=True,
    help="whether v2 callers must present the client certificate written to --tls-dir",
)
@click.option(
    "--tls-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="write the run's CA and a client certificate here (default: a private temporary directory; "
    "the files are removed on exit)",
)
def serve(
    model: str,
    weights: str | None,
    seed: int,
    input_shape: str | None,
    nodes: str,
    nodes_file: Path | None,
    host: str,
    http_port: int,
    grpc_port: int,
    model_name: str,
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
    insecure: bool,
    client_auth: str,
    tls_dir: Path | None,
) -> None:
    """Serve a model split over local node agents until Ctrl-C, behind the Open Inference
    Protocol (KServe/Triton v2: REST with binary tensors, and gRPC).

    The front doors speak TLS with a certificate of the run's own CA and, by default, require
    the client certificate written next to it (the printed curl line uses them); --insecure
    serves plaintext. They listen on loopback unless --host says otherwise."""
    from amp4ec.local import parse_nodes
    from amp4ec.local.serve import ServeConfig
    from amp4ec.local.serve import serve as serve_local

    if insecure and tls_dir is not None:
        raise click.BadParameter("no TLS files with --insecure", param_hint="--tls-dir")
    if tls_dir is not None:  # made now: a folder that cannot be made fails before the agents start
        try:
            tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            message = f"cannot create {tls_dir}: {e.strerror}"
            raise click.BadParameter(message, param_hint="--tls-dir") from None
    for name, port in (("--http-port", http_port), ("--grpc-port", grpc_port)):
        if not 0 <= port <= 65535:
            raise click.BadParameter(f"expected 0..65535, got {port}", param_hint=name)
    policy = compression_from(compression, max_output_error)
    batching = batching_from(batch, batch_delay_ms)
    rate_rps = rate_from(objective, rate)
    config = ServeConfig(
        source=source_from(model, weights, seed, input_shape),
        nodes=() if nodes_file else tuple(parse_nodes(nodes)),
        nodes_file=nodes_file,
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        model_name=model_name,
        strategy=strategy,
        objective=objective,
        rate_rps=rate_rps,
        tiles=tiles,
        limit_mode=cpu_limits,
        cfs_period_us=cfs_period,
        secure=not insecure,
        client_auth=client_auth == "required",
        tls_dir=tls_dir,
        compression=policy,
        batching=batching,
    )
    console = Console(highlight=False, soft_wrap=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def say(text: str) -> None:
        console.print(text, markup=False)

    def step(text: str) -> None:
        Console(stderr=True).print(f"[dim]{text}…[/]")

    asyncio.run(serve_local(config, say, step))
