"""The Dockerfiles, read (no Docker engine here): they build the code and extras the tests run."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.deploy.chart import ROOT, one, render

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

DOCKER = ROOT / "docker"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(name: str) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DOCKER / name).read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def final_stage(name: str) -> list[tuple[str, str]]:
    steps = instructions(name)
    start = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[start:]


@pytest.mark.parametrize(
    ("name", "extra"), [("operator.Dockerfile", "operator"), ("node-agent.Dockerfile", "agent")]
)
def test_images_install_the_repository_with_its_extra(name: str, extra: str) -> None:
    steps = instructions(name)
    copies = " ".join(arg for op, arg in steps if op == "COPY" and "--from" not in arg)
    for needed in ("pyproject.toml", "README.md", "amp4ec"):  # README.md: pyproject's readme
        assert needed in copies
    assert PYPROJECT["project"]["readme"] == "README.md"
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["amp4ec*"]
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert f'pip install ".[{extra}]"' in runs
    assert "pip install -e" not in runs  # a wheel, not the source tree
    ignore = (DOCKER / f"{name}.dockerignore").read_text().split()
    assert ignore[ignore.index("*") :][:4] == ["*", "!pyproject.toml", "!README.md", "!amp4ec/"]
    user = [arg for op, arg in final_stage(name) if op == "USER"]
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0"
    assert "buildx build --platform linux/amd64,linux/arm64" in (DOCKER / name).read_text()


def test_operator_image_has_no_torch_and_runs_kopf() -> None:
    text = (DOCKER / "operator.Dockerfile").read_text()
    assert "torch" not in re.sub(r"(?m)^#.*$", "", text).replace("'torch' not in sys.modules", "")
    extra = PYPROJECT["project"]["optional-dependencies"]["operator"]
    assert not [d for d in extra if d.startswith("torch")] and any(d.startswith("kopf") for d in extra)
    (c,) = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert c["command"][0] == "kopf"  # the kopf console script of the operator extra


def test_node_agent_image_pins_the_cpu_torch_the_tests_run() -> None:
    (pin,) = [d for d in PYPROJECT["project"]["optional-dependencies"]["agent"] if d.startswith("torch")]
    version = pin.split("==")[1]
    args = dict(
        arg.split("=", 1) for op, arg in instructions("node-agent.Dockerfile") if op == "ARG" and "=" in arg
    )
    assert args["TORCH_VERSION"] == version
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    runs = [arg for op, arg in instructions("node-agent.Dockerfile") if op == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if "TORCH_INDEX" in r)
    extra_step = next(i for i, r in enumerate(runs) if '".[agent]"' in r)
    assert torch_step < extra_step, "CPU torch before the extra, so pip keeps it"
    env = " ".join(arg for op, arg in final_stage("node-agent.Dockerfile") if op == "ENV")
    assert "HOME=/tmp" in env  # read-only root filesystem: caches go to the /tmp emptyDir


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_hack_scripts_parse_and_say_they_need_docker() -> None:
    scripts = [*sorted(ROOT.glob("hack/kind-*.sh")), ROOT / "hack" / "e2e-kind.sh"]
    assert len(scripts) >= 2
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True)
        head = script.read_text().split("\n\n", 1)[0]
        assert "not run in CI" in head, script.name
    assert "Docker" in (ROOT / "hack" / "e2e-kind.sh").read_text().split("\n\n", 1)[0]
