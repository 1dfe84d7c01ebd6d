"""``amp4ec models``: the zoo's models, their default input and what they are."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from amp4ec.cli.options import examples

__all__ = ["models"]


@click.command(
    epilog=examples(
        "amp4ec models",
        "amp4ec run --model resnet18 --nodes 1.0,0.5",
    )
)
def models() -> None:
    """List the models of the zoo (any of them is a valid --model)."""
    from amp4ec.models import ZOO

    table = Table(title="model zoo (random weights unless --weights names a local state_dict)")
    table.add_column("--model")
    table.add_column("input shape")
    table.add_column("description")
    for name, entry in ZOO.items():
        table.add_row(name, ",".join(map(str, entry.input_shape)), entry.description)
    Console().print(table)
    click.echo("Other models: a torch.export archive (path/to/model.pt2) or package.module:factory.")
