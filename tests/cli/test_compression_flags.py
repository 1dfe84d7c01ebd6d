"""``--compression`` and ``--max-output-error`` on ``amp4ec plan``: the plan shows each cut's
codec and the estimated error within the bound; bad values are one red line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from amp4ec.cli import cli

# ResNet-18 at 32x32 over three nodes whose memory forces a split (320 MiB less the agent's 288).
PLAN = ["plan", "--model", "resnet18", "--input-shape", "1,3,32,32", "--nodes", "1.0:320M,1.0:320M,1.0:320M"]


def _plan(tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(cli, [*PLAN, *flags, "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    data["output"] = result.output
    return data


def test_plan_compresses_slow_cuts_within_the_bound(tmp_path: Path) -> None:
    slow = _plan(tmp_path, "--bandwidth-mbps", "2", "--compression", "auto")
    codecs = [row["out_codec"] for row in slow["plan"]]
    assert len(codecs) > 1 and set(codecs[:-1]) <= {"fp16", "int8"}
    assert 0 < slow["predicted"]["output_error"] <= 0.01
    assert "sends" in slow["output"] and "estimated output error" in slow["output"]
    assert slow["compression"] == {"mode": "auto", "max_output_error": 0.01}
    # (A bound of 0 and fast links leaving every cut raw: tests/planner/test_compression.py.)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--compression", "zip"], "'zip' is not one of 'off', 'auto'"),
        (["--compression", "auto", "--max-output-error", "-1"], "--max-output-error: expected a finite"),
        (["--compression", "auto", "--max-output-error", "inf"], "--max-output-error: expected a finite"),
    ],
)
def test_bad_compression_flags_one_line_and_exit_2(flags: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, [*PLAN, *flags])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
