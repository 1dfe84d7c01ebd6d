"""``amp4ec infer``: send one tensor to a deployment's entry point and print the answer.

The input is a tensor file saved with ``torch.save`` (loaded with ``weights_only=True``: a
tensor, or a tuple/list of tensors), a NumPy ``.npy`` array, JSON (a v2 request body or a
nested list) or a PNG/JPEG image (``cli/inputs.py``). Classification outputs (one row of
scores) print their top-k classes; every output prints its shape and dtype.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from amp4ec.cli.checks import check_at_least, check_writable_file
from amp4ec.cli.inputs import load_input
from amp4ec.cli.options import examples
from amp4ec.errors import InvalidSpec

__all__ = ["infer", "load_input"]


@click.command(
    epilog=examples(
        "kubectl port-forward svc/mobilenet-v2 50051:50051 &",
        "amp4ec infer --endpoint localhost:50051 --input x.pt --top-k 3",
        "amp4ec infer -e localhost:50051 -i cat.png --ca ca.crt --cert tls.crt --key tls.key",
    )
)
@click.option("--endpoint", "-e", required=True, help="HOST:PORT of the entry Service (status.endpoint)")
@click.option(
    "--input",
    "-i",
    "input_path",
    required=True,
    type=click.Path(path_type=Path),
    help="tensor file (torch.save, loaded with weights_only=True), .npy array, .json (v2 request body or "
    "nested list) or .png/.jpg image (1x3xHxW, scaled to [0, 1]; needs Pillow)",
)
@click.option("--top-k", "-k", type=int, default=5, show_default=True, help="classes shown for score outputs")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="seconds to wait for the answer")
@click.option(
    "--output",
    "-o",
    "output_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="also save the outputs here with torch.save",
)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.option(
    "--ca",
    type=click.Path(dir_okay=False, path_type=Path),
    help="CA certificate (ca.crt of the client Secret)",
)
@click.option("--cert", type=click.Path(dir_okay=False, path_type=Path), help="client certificate (tls.crt)")
@click.option("--key", type=click.Path(dir_okay=False, path_type=Path), help="client private key (tls.key)")
@click.option(
    "--server-identity",
    help="identity the entry must present (default: stage 0 of the deployment the client certificate names)",
)
@click.option("--insecure", is_flag=True, help="plaintext, for a deployment served without TLS")
def infer(
    endpoint: str,
    input_path: Path,
    top_k: int,
    timeout: float,
    output_path: Path | None,
    as_json: bool,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    server_identity: str | None,
    insecure: bool,
) -> None:
    """Send one request to an InferenceDeployment (or any entry shard) and print the result.

    Mutual TLS by default: the client Secret ``<deployment>-amp4ec-client`` holds ca.crt,
    tls.crt and tls.key (see docs/security.md).
    """
    # Checked before torch loads: a typo answers at once.
    if ":" not in endpoint:
        raise InvalidSpec(f"--endpoint: expected HOST:PORT, got {endpoint!r}")
    if not input_path.is_file():
        raise InvalidSpec(f"--input: no such file {str(input_path)!r}")
    check_at_least(top_k, "--top-k")
    check_writable_file(output_path, "--output")

    import torch

    from amp4ec import pki
    from amp4ec.client import Client, Endpoint
    from amp4ec.wire.transport import TransportSecurity

    if insecure:
        security, identity = TransportSecurity.plaintext(), ""
    else:
        security = TransportSecurity.from_files(ca, cert, key, flags="--")
        identity = server_identity or pki.entry_identity_for_client(security.identity)
    tensors = load_input(input_path)

    async def call() -> Any:
        async with Client([Endpoint(endpoint, identity=identity)], security) as client:
            return await client.infer(tensors, deadline_s=timeout)

    result = asyncio.run(asyncio.wait_for(call(), timeout))
    if output_path is not None:
        torch.save(result.outputs if len(result.outputs) > 1 else result.outputs[0], output_path)
    outputs = []
    for t in result.outputs:
        entry: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        if t.is_floating_point() and t.dim() == 2 and t.shape[0] >= 1 and t.shape[1] > 1:
            probs = torch.softmax(t.float(), dim=1)
            k = min(top_k, t.shape[1])
            values, indices = probs.topk(k, dim=1)
            entry["top_k"] = [
                [{"class": int(i), "probability": float(p)} for p, i in zip(vs, ix, strict=True)]
                for vs, ix in zip(values, indices, strict=True)
            ]
        outputs.append(entry)
    stages = [
        {"stage": s.stage, "forward_ms": s.forward_us / 1000, "queue_ms": s.queue_us / 1000}
        for s in result.timings
    ]
    if as_json:
        click.echo(json.dumps({"latency_ms": result.latency_s * 1000, "outputs": outputs, "stages": stages}))
        return
    console = Console()
    for n, entry in enumerate(outputs):
        console.print(f"output {n}: shape {tuple(entry['shape'])} {entry['dtype']}")
        for row, top in enumerate(entry.get("top_k", [])):
            table = Table(title=f"top {len(top)} (row {row})")
            table.add_column("class", justify="right")
            table.add_column("probability", justify="right")
            for item in top:
                table.add_row(str(item["class"]), f"{item['probability']:.4f}")
            console.print(table)
    console.print(
        f"latency {result.latency_s * 1000:.1f} ms over {len(stages)} stage(s) via {result.entry}",
        highlight=False,
    )
