"""``amp4ec models`` lists every zoo model by the name ``--model`` takes."""

from __future__ import annotations

from click.testing import CliRunner

from amp4ec.cli import cli
from amp4ec.models import ZOO


def test_models_lists_every_zoo_entry_with_its_input_shape() -> None:
    result = CliRunner().invoke(cli, ["models"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for name, entry in ZOO.items():
        line = next((ln for ln in result.output.splitlines() if f" {name} " in ln), None)
        assert line is not None, f"{name} missing from:\n{result.output}"
        assert ",".join(map(str, entry.input_shape)) in line
