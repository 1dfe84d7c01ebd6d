"""The CRD, its examples, and manifests/ generated from the chart (no drift)."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from amp4ec.operator.spec import parse_spec
from tests.deploy.chart import CHART, ROOT, crd, gen_manifests, load_strict

EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))


def crd_validator() -> jsonschema.Validator:
    """The served version's openAPIV3Schema as a JSON Schema (``nullable`` is OpenAPI-only and ignored)."""
    (version,) = [v for v in crd()["spec"]["versions"] if v["served"] and v["storage"]]
    schema = version["schema"]["openAPIV3Schema"]
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def test_manifests_are_generated_from_the_chart() -> None:
    """Run ``.venv/bin/python hack/gen-manifests.py`` after changing the chart."""
    wanted = gen_manifests().manifests()
    committed = {p.name: p.read_text() for p in (ROOT / "manifests").glob("*.yaml")}
    assert sorted(committed) == sorted(wanted)
    stale = [name for name, text in wanted.items() if committed[name] != text]
    assert stale == [], f"manifests/ drifted from the chart: {stale}; run hack/gen-manifests.py"


def test_manifests_load_strictly_and_validate() -> None:
    for path in sorted((ROOT / "manifests").glob("*.yaml")):
        text = path.read_text()
        for doc in text.split("\n---\n"):
            obj = load_strict(doc)
            if obj["apiVersion"] != "amp4ec.io/v1alpha1":
                kubernetes_validate.validate(obj, "1.30", strict=True)


def test_chart_crd_is_manifests_crd() -> None:
    """The operator's tests read manifests/crd.yaml; it must mean what the chart installs."""
    assert load_strict((ROOT / "manifests" / "crd.yaml").read_text()) == crd()


def test_crd_is_a_valid_kubernetes_object_with_the_kserve_conventions() -> None:
    obj = crd()
    kubernetes_validate.validate(obj, "1.30", strict=True)
    (version,) = obj["spec"]["versions"]
    assert version["subresources"] == {"status": {}}
    assert obj["spec"]["names"]["shortNames"] == ["idep"]
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Ready", "Stages", "Nodes", "Age"} <= columns


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_the_crd_and_the_operator(path: Any) -> None:
    obj = load_strict(path.read_text())
    group = crd()["spec"]["group"]
    assert obj["apiVersion"] == f"{group}/v1alpha1" and obj["kind"] == crd()["spec"]["names"]["kind"]
    crd_validator().validate(obj)
    parse_spec(obj["spec"])  # and what the API server admits, the operator accepts


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda s: s.update(strategy="fastest"), ["spec", "strategy"]),
        (lambda s: s.update(maxStages=0), ["spec", "maxStages"]),
        (lambda s: s["model"].update(name="rm -rf /"), ["spec", "model", "name"]),
        (lambda s: s.update(inputShape=[1, 0]), ["spec", "inputShape", 1]),
        (lambda s: s.pop("model"), ["spec"]),
        (lambda s: s["replan"].update(intervalSeconds=1), ["spec", "replan", "intervalSeconds"]),
        (lambda s: s.update(objective="p99"), ["spec", "objective"]),
        (lambda s: s.update(tiles="no"), ["spec", "tiles"]),
        (lambda s: s.update(objective="p95", targetRate=0), ["spec", "targetRate"]),
    ],
)
def test_the_crd_schema_rejects_bad_resources(change: Any, path: list[Any]) -> None:
    obj = copy.deepcopy(load_strict(EXAMPLES[0].read_text()))
    change(obj["spec"])
    errors = list(crd_validator().iter_errors(obj))
    assert errors and any(list(e.absolute_path) == path for e in errors), [e.message for e in errors]
