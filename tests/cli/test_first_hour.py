"""What a new user meets first: bad flags refused at once (before torch loads), one-line errors,
results never lost, memory in MiB with the agent's own baseline counted, examples in --help."""

from __future__ import annotations

import errno
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from amp4ec.cli import cli
from amp4ec.errors import InvalidSpec
from amp4ec.nodes import AGENT_BASELINE_BYTES, parse_nodes, usable_memory

ROOT = Path(__file__).resolve().parents[2]

# Runs the CLI in a fresh interpreter and says whether torch was imported by the time it exited.
# argv[1]: comma-separated modules to make unimportable (e.g. matplotlib), or "-".
PROBE = """
import sys
for name in filter(None, sys.argv[1].strip("-").split(",")):
    sys.modules[name] = None
from amp4ec.cli import cli
try:
    cli.main(sys.argv[2:], prog_name="amp4ec")
finally:
    print("torch imported:", "torch" in sys.modules, file=sys.stderr)
"""


def probe(args: list[str], blocked: str = "-") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROBE, blocked, *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--requests", "0"], "--requests: expected at least 1"),
        (["run", "--concurrency", "0"], "--concurrency: expected at least 1"),
        (["run", "--json", "no/such/folder/result.json"], "--json: folder no/such/folder does not exist"),
        (["run", "--nodes", "1.0:200M"], "--nodes[0] memory: 200 MiB leaves nothing for a shard"),
        (["run", "--nodes", "1.0,x"], "--nodes[1]: expected a CPU share"),
        (["run", "--fault", "node7:kill@1s"], "--fault node7:kill@1s: no node 'node7'"),
        (["run", "--model", "no_such_model"], "--model: unknown zoo name 'no_such_model'"),
        (["run", "--weights", "no/such.pth"], "--weights: file no/such.pth does not exist"),
        (["run", "--input-shape", "1,3,a"], "--input-shape"),
        (["plan", "--json", "no/such/folder/plan.json"], "--json: folder no/such/folder does not exist"),
        (["plan", "--nodes", "0.5:100M"], "--nodes[0] memory"),
        (["bench", "--out", "pyproject.toml"], "Invalid value for '--out'"),  # click's own check
        (["infer", "--endpoint", "localhost", "--input", "x.pt"], "--endpoint: expected HOST:PORT"),
        (["infer", "--endpoint", "localhost:1", "--input", "no/such.pt"], "--input: no such file"),
        (["run", "--strategy", "fastest"], "Invalid value for '--strategy'"),
    ],
)
def test_bad_flags_are_refused_before_torch_loads(args: list[str], message: str) -> None:
    done = probe(args)
    assert done.returncode == 2, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if not ln.startswith("torch imported:")]
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "torch imported: False" in done.stderr


def test_bench_without_matplotlib_refuses_at_once_with_the_install_hint() -> None:
    done = probe(["bench", "--quick"], blocked="matplotlib")
    assert done.returncode == 2, done.stderr
    assert "pip install 'amp4ec[bench]'" in done.stderr and "--no-plots" in done.stderr
    assert "torch imported: False" in done.stderr


def test_bench_writes_docs_only_when_told(tmp_path: Path) -> None:
    from amp4ec.cli.bench import DOCS

    assert DOCS == ROOT / "docs" / "benchmarks.md"  # the clone's page, whatever the current folder
    help_text = CliRunner().invoke(cli, ["bench", "--help"], terminal_width=200).output
    assert "--update-docs" in help_text and "default: docs/benchmarks.md" not in help_text


def test_json_that_cannot_be_written_at_the_end_is_one_line_after_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "plan.json"
    write_text = pathlib.Path.write_text

    def full_disk(self: Path, *args: object, **kwargs: object) -> int:
        if self == target:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    args = ["plan", "--model", "resnet18", "--input-shape", "1,3,32,32", "--nodes", "1.0,0.5"]
    result = CliRunner().invoke(cli, [*args, "--json", str(target)], terminal_width=200)
    assert result.exit_code == 2, result.output
    assert "bottleneck" in result.output  # the plan was printed first
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert errors == [
        f"error: --json: could not write {target} (No space left on device); the results are printed above"
    ]
    assert "Traceback" not in result.output


def test_node_memory_is_mib_less_the_agents_baseline() -> None:
    (node,) = parse_nodes("1.0:512M")
    assert node.memory_bytes == 512 * 2**20
    assert usable_memory(node) == 512 * 2**20 - AGENT_BASELINE_BYTES
    with pytest.raises(InvalidSpec, match=r"--nodes\[0\] memory: 288 MiB leaves nothing"):
        parse_nodes("1.0:288M")


def test_plan_counts_the_agent_baseline_and_says_mib() -> None:
    # resnet18's parameters are 44.7 MiB: 320 MiB less the 288 MiB baseline cannot hold them.
    args = ["plan", "--model", "resnet18", "--input-shape", "1,3,32,32"]
    refused = CliRunner().invoke(cli, [*args, "--nodes", "1.0:320M"], terminal_width=200)
    assert refused.exit_code == 2, refused.output
    assert "MiB" in refused.output and " MB" not in refused.output and "Traceback" not in refused.output
    fits = CliRunner().invoke(cli, [*args, "--nodes", "1.0:384M"], terminal_width=200)
    assert fits.exit_code == 0, fits.output
    assert "MiB" in fits.output and "MB" not in fits.output.replace("MiB", "")


def test_plan_and_run_refuse_more_nodes_than_blocks_alike() -> None:
    nodes = ",".join(["0.1"] * 15)  # resnet18 has 14 blocks
    args = ["--model", "resnet18", "--input-shape", "1,3,32,32", "--nodes", nodes]
    planned = CliRunner().invoke(cli, ["plan", *args], terminal_width=300)
    ran = CliRunner().invoke(cli, ["run", *args], terminal_width=300)
    assert planned.exit_code == ran.exit_code == 2
    expected = "--nodes: 15 nodes but resnet18 has only 14 blocks; give at most 14"
    assert expected in planned.output and expected in ran.output


def test_emulated_limits_say_why() -> None:
    from amp4ec.local import LocalCluster

    chosen = LocalCluster([], "emulate").limit_description
    assert "(--cpu-limits emulate)" in chosen and "permission" not in chosen


def test_every_help_has_an_example() -> None:
    for name in [None, *cli.commands]:
        args = [name, "--help"] if name else ["--help"]
        result = CliRunner().invoke(cli, args, terminal_width=200)
        assert result.exit_code == 0, result.output
        assert "Example" in result.output and "amp4ec " in result.output.partition("Example")[2], name


def test_zoo_names_the_cli_checks_are_the_zoos() -> None:
    from amp4ec.cli.options import ZOO_NAMES
    from amp4ec.models import ZOO

    assert set(ZOO_NAMES) == set(ZOO)


def test_an_agent_killed_for_memory_is_said_to_have_run_out_of_memory(tmp_path: Path) -> None:
    from amp4ec.local.cgroups import NodeCgroup
    from amp4ec.local.cluster import _Agent
    from amp4ec.nodes import NodeSpec

    group = object.__new__(NodeCgroup)  # the files a cgroup v1 memory controller shows, no cgroup made
    group.dirs = [tmp_path]
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    process = subprocess.Popen(
        [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    )
    process.wait()
    node = NodeSpec("node0", 1.0, 300 * 2**20)
    agent = _Agent(node, process, tmp_path / "port", tmp_path / "control", tmp_path / "log", group)
    assert agent.exit_reason().startswith("ran out of memory: the kernel killed it at its 300 MiB limit")
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    assert agent.exit_reason().startswith("was killed (SIGKILL): most likely out of memory")


def test_a_whole_pickled_model_as_weights_gets_one_clean_line_and_the_fix(tmp_path: Path) -> None:
    import torch

    from tests.model_zoo import residual_net

    path = tmp_path / "whole.pth"
    torch.save(residual_net(), path)  # the model object, not its state_dict
    args = ["plan", "--model", "tests.model_zoo:residual_net", "--weights", str(path), "--nodes", "1.0"]
    result = CliRunner().invoke(cli, args, terminal_width=400)
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert "holds a pickled object (tests.model_zoo.ResidualNet)" in line
    assert line.endswith("save `model.state_dict()` instead") and "\x1b" not in line


def test_torch_error_text_is_cleaned_not_cut_mid_sentence() -> None:
    from amp4ec.slicing.materialise import weights_load_error

    torch_like = RuntimeError(
        "Load failed. \x1b[1mOnly if you trust it\x1b[0m.\n\t" + "More advice here. " * 30
    )
    message = str(weights_load_error("w.pth", torch_like))
    assert "\x1b" not in message and "\n" not in message and "\t" not in message
    assert "Load failed. Only if you trust it." in message
    assert message.endswith("here. …)")


def test_a_factory_in_the_current_folder_loads_with_its_flag_named(tmp_path: Path) -> None:
    (tmp_path / "mymodels.py").write_text(
        "from torch import nn\n\n"
        "def build():\n    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))\n\n"
        "def shaped():\n    return build()\n\nshaped.input_shape = (1, 8)\n"
    )
    # A script outside the folder, as the console script is: its own folder starts sys.path.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "amp4ec").write_text("from amp4ec.cli import main\nmain()\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def amp4ec(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, str(bin_dir / "amp4ec"), "plan", "--nodes", "1.0", *args]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    ok = amp4ec("--model", "mymodels:shaped")
    assert ok.returncode == 0, ok.stderr
    assert "bottleneck" in ok.stdout
    unshaped = amp4ec("--model", "mymodels:build")
    assert unshaped.returncode == 2
    assert "give --input-shape" in unshaped.stderr and len(unshaped.stderr.strip().splitlines()) == 1


def test_a_clone_root_shadowing_the_package_still_runs() -> None:
    # What a clone's parent on PYTHONPATH makes of ``amp4ec`` next to an editable install:
    # a namespace package without the package's attributes (see amp4ec.cli's note).
    script = (
        "import sys, types\n"
        f"ns = types.ModuleType('amp4ec'); ns.__path__ = [{str(ROOT / 'amp4ec')!r}]\n"
        "sys.modules['amp4ec'] = ns\n"
        "from amp4ec.cli import cli\n"
        "cli.main(['--version'], prog_name='amp4ec')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("amp4ec, version ")


def test_an_unforeseen_error_is_one_line_and_the_traceback_is_on_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rich.table import Table

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("\x1b[1mboom\x1b[0m,\n\tsecond line")

    monkeypatch.setattr(Table, "add_row", broken)
    result = CliRunner().invoke(cli, ["models"], terminal_width=200)
    assert result.exit_code == 2
    assert (
        result.output.strip()
        == "error: unexpected RuntimeError: boom, second line (AMP4EC_DEBUG=1 shows where)"
    )
    monkeypatch.setenv("AMP4EC_DEBUG", "1")
    debug = CliRunner().invoke(cli, ["models"], terminal_width=200)
    assert isinstance(debug.exception, RuntimeError)  # raised as is, traceback and all
