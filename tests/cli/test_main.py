"""The amp4ec command line: bad input gets one clear line and a non-zero exit."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from amp4ec.cli import cli
from amp4ec.local.cgroups import cgroups_available
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--model", "no_such_model", "--nodes", "1.0"], "no_such_model"),
        (["run", "--nodes", "1.0,-0.5"], "--nodes[1]: expected a CPU share > 0"),
        (["run", "--model", "mobilenet_v2", "--nodes", ",".join(["0.1"] * 99)], "99 nodes but"),
        (["run", "--input-shape", "1,3,a"], "--input-shape"),
        (["run", "--model", str(ROOT / "missing.pt2")], "missing.pt2"),
        (["run", "--batch", "0"], "--batch: expected 1 to 64"),
        (["plan", "--batch", "65"], "--batch: expected 1 to 64"),
        (["serve", "--batch-delay-ms", "-1"], "--batch-delay-ms: expected 0 to 1000 ms"),
        (["plan", "--objective", "p95"], "--rate: --objective p95 needs the arrival rate"),
        (["run", "--rate", "40"], "--rate: only --objective p95 takes a rate"),
        (["serve", "--objective", "p95", "--rate", "0"], "--rate: expected a positive number"),
    ],
)
def test_bad_arguments_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_console_script_runs_the_main_job(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "amp4ec",
            "run",
            "--model",
            "resnet18",
            "--input-shape",
            "1,3,64,64",
            "--nodes",
            "1.0,0.5",
            "--requests",
            "6",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "max |distributed − monolith|" in proc.stdout
    data = json.loads(out.read_text())
    assert set(data) >= {"plan", "latency_ms", "throughput_rps", "max_abs_diff"}
    assert set(data["latency_ms"]) == {"p50", "p95"}
    assert {"node", "first_block", "last_block"} <= set(data["plan"][0])
    assert data["max_abs_diff"] < 1e-4


def test_plan_prints_and_writes_json_for_every_strategy(tmp_path: Path) -> None:
    from amp4ec.cli.options import STRATEGIES

    for strategy in STRATEGIES:
        out = tmp_path / f"{strategy}.json"
        result = CliRunner().invoke(
            cli,
            [
                "plan",
                "--model",
                "resnet18",
                "--input-shape",
                "1,3,32,32",
                "--nodes",
                "1.0:1G,0.6:512M,0.4:512M",
                "--strategy",
                strategy,
                "--json",
                str(out),
            ],
        )
        assert result.exit_code == 0, result.output
        assert "bottleneck" in result.output and "planning" in result.output
        data = json.loads(out.read_text())
        assert set(data) >= {"plan", "predicted", "planning_ms"}
        predicted = {
            "stage_ms",
            "bottleneck_ms",
            "latency_ms",
            "throughput_rps",
            "output_error",
            "saturation_rps",
            "under_load",
        }
        assert set(data["predicted"]) == predicted
        under_load = data["predicted"]["under_load"]  # at 90% of the predicted throughput
        assert under_load["rate_rps"] == pytest.approx(0.9 * data["predicted"]["throughput_rps"])
        assert data["predicted"]["latency_ms"] * 0.9 <= under_load["p50_ms"] <= under_load["p95_ms"]
        assert sum(under_load["pipeline_shares"]) == pytest.approx(1.0)
        assert data["batching"] == {"max_requests": 1, "max_queue_delay_ms": 0.0}
        # Without batching nothing batches: saturation is the batch-1 throughput.
        assert data["predicted"]["saturation_rps"] == pytest.approx(data["predicted"]["throughput_rps"])
        assert set(under_load["stage_batches"]) == {1.0}
        assert all(b["batch_ms"] == [] for b in data["blocks"])
        assert data["strategy"] == strategy
        for pipeline in {row["pipeline"] for row in data["plan"]}:
            rows = [r for r in data["plan"] if r["pipeline"] == pipeline]
            assert rows[0]["first_block"] == 0 and rows[-1]["last_block"] == 13  # resnet18: 14 blocks
            assert all(a["last_block"] + 1 == b["first_block"] for a, b in itertools.pairwise(rows))
        assert max(data["predicted"]["stage_ms"]) == pytest.approx(data["predicted"]["bottleneck_ms"])


def test_plan_with_batching_profiles_the_batches_and_predicts_with_them(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    args = ["plan", "--model", "mobilenet_v2", "--input-shape", "1,3,32,32", "--nodes", "1.0:1G,0.5:1G"]
    result = CliRunner().invoke(cli, [*args, "--batch", "4", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "with it: saturation" in result.output
    data = json.loads(out.read_text())
    assert all([b for b, _ in block["batch_ms"]] == [2, 4] for block in data["blocks"])
    predicted = data["predicted"]
    assert predicted["saturation_rps"] > 0
    batches = predicted["under_load"]["stage_batches"]
    assert len(batches) == len(data["plan"]) and all(1.0 <= b <= 4.0 for b in batches)


def test_plan_that_fits_nowhere_is_a_clear_error() -> None:
    result = CliRunner().invoke(
        cli, ["plan", "--model", "resnet18", "--input-shape", "1,3,32,32", "--nodes", "1.0:1M,0.5:1M"]
    )
    assert result.exit_code == 2
    assert "MiB" in result.output and "Traceback" not in result.output


def _children(pid: int) -> list[int]:
    kids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            kids.append(int(status.parent.name))
    return kids


def _amp4ec_cgroups(pid: int) -> list[Path]:
    """The cgroup v1 directories local mode made that the process runs in (none off-root)."""
    dirs = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "/amp4ec-" in path:
            dirs += [Path("/sys/fs/cgroup", c, path.lstrip("/")) for c in controllers.split(",") if c]
    return dirs


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_every_agent_and_removes_cgroups(signum: int) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "amp4ec",
            "run",
            "--model",  # small: what is tested is the interrupt, not the model
            "tests.model_zoo:residual_net",
            "--nodes",
            "0.5,0.5",
            "--requests",
            "1000000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        # The progress bar rendered into the pipe says when the request loop runs.
        env={**os.environ, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "120"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background shell ignores it
    )
    out = bytearray()

    def pump() -> None:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(4096):
            out.extend(chunk)

    reader = threading.Thread(target=pump)
    reader.start()
    try:
        # Interrupt inside the request loop: at least one request answered ("requests … n/1000000").
        wait_for(
            lambda: proc.poll() is not None or re.search(rb"requests.*?[1-9]\d*/1000000", bytes(out)),
            180,
            "the request loop",
        )
        assert proc.poll() is None, bytes(out).decode(errors="replace")[-2000:]
        agents = _children(proc.pid)
        groups = [d for pid in agents for d in _amp4ec_cgroups(pid)]
        proc.send_signal(signum)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(10)
    text = bytes(out).decode(errors="replace")
    assert proc.returncode == 130, text[-2000:]
    assert "interrupted" in text
    assert len(agents) == 2
    for pid in agents:
        assert not Path(f"/proc/{pid}").exists(), f"agent {pid} outlived the runner"
    if cgroups_available():  # each agent ran in its own CPU quota, and every one is gone
        assert len(groups) >= 2, groups
        assert [g for g in groups if g.exists()] == []
    else:
        assert groups == []  # emulated limits: no cgroup to remove


def test_cpu_limit_choices_are_the_local_clusters() -> None:
    from amp4ec.cli.options import LIMIT_MODES
    from amp4ec.local import LIMIT_MODES as CLUSTER_MODES

    assert LIMIT_MODES == CLUSTER_MODES


def test_plan_with_the_p95_objective_reports_its_rate_and_choice() -> None:
    args = [
        "plan",
        "--model",
        "resnet18",
        "--input-shape",
        "1,3,32,32",
        "--nodes",
        "1.0:1G,0.6:512M,0.4:512M",
    ]
    result = CliRunner().invoke(cli, [*args, "--objective", "p95", "--rate", "5"])
    assert result.exit_code == 0, result.output
    assert "objective p95" in result.output and "predicted at 5 req/s" in result.output


@pytest.mark.parametrize(("flag", "tiles"), [("--tiles", True), ("--no-tiles", False), (None, True)])
def test_plan_passes_the_tiles_switch_to_the_planner(monkeypatch, flag: str | None, tiles: bool) -> None:
    """``--no-tiles`` keeps the optimal strategy layer-wise (docs/benchmarks.md: a tiled plan's
    predicted latency can be optimistic); tiles stay allowed by default."""
    import amp4ec.plan_timer

    seen: dict[str, object] = {}
    real = amp4ec.plan_timer.timed_plan

    def spy(*args, **options):
        seen.update(options)
        return real(*args, **options)

    monkeypatch.setattr(amp4ec.plan_timer, "timed_plan", spy)
    args = ["plan", "--model", "tests.model_zoo:residual_net", "--nodes", "1.0,0.5", "--objective", "latency"]
    result = CliRunner().invoke(cli, [*args, *([flag] if flag else [])])
    assert result.exit_code == 0, result.output
    assert seen["tiles"] is tiles
