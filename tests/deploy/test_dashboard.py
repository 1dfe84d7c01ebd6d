"""The Grafana dashboard asks only for series that exist: amp4ec's own, or standard ones the operator reads.

Exported metrics are parsed from the code (``Histogram(``/``Counter(``/``Gauge(``/``Summary(``
calls with a literal name anywhere in ``amp4ec/``), with the series names prometheus_client
exposes for each type. Standard series (kube-state-metrics, node-exporter) are allowed exactly
when the operator's own PromQL (``amp4ec.operator.capacity.QUERIES``) reads them.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from typing import Any

from amp4ec.operator.capacity import QUERIES
from tests.deploy.chart import CHART, ROOT

DASHBOARD = CHART / "dashboards" / "amp4ec.json"

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "atan2", "inf", "nan",
}  # fmt: skip
_SUFFIXES = {
    "Histogram": ("_bucket", "_sum", "_count", "_created"),
    "Summary": ("", "_sum", "_count", "_created"),
    "Counter": ("_total", "_created"),
    "Gauge": ("",),
}


def exported_series() -> dict[str, str]:
    """Series name → the metric it belongs to, for every metric defined in amp4ec/."""
    series: dict[str, str] = {}
    for path in sorted((ROOT / "amp4ec").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name | ast.Attribute)):
                continue
            kind = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
            if kind not in _SUFFIXES or not node.args:
                continue
            first = node.args[0]
            assert isinstance(first, ast.Constant) and isinstance(first.value, str), (
                f"{path}:{node.lineno}: metric names must be literals for this check"
            )
            base = first.value.removesuffix("_total") if kind == "Counter" else first.value
            for suffix in _SUFFIXES[kind]:
                series[base + suffix] = first.value
    return series


def metric_names(promql: str) -> set[str]:
    """Metric names in a PromQL expression (Grafana variables and label matchers removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', promql)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana variables
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word, rest = match.group(), text[match.end() :].lstrip()
        if rest.startswith("(") or word in _KEYWORDS:
            continue  # a function call or a keyword
        names.add(word)
    return names


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dashboard["panels"]:
        yield p
        yield from p.get("panels", [])


def expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            exprs.append(inner.group(1) if inner else query)
    return exprs


def test_metric_name_parser() -> None:
    assert metric_names(
        "histogram_quantile(0.95, sum by (le, node) "
        '(rate(a_b_bucket{x=~"$y", code!="OK"}[$__rate_interval])))'
        " / on (node) group_left max by (node) (c_d) > 0 or vector(0)"
    ) == {"a_b_bucket", "c_d"}
    assert metric_names(
        'label_replace(node_memory_MemAvailable_bytes, "node", "$1", "instance", "(.+)")'
    ) == {"node_memory_MemAvailable_bytes"}


def test_every_dashboard_metric_is_exported_or_read_by_the_operator() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_series()
    standard = {name for query in QUERIES.values() for name in metric_names(query)} - set(exported)
    assert standard == {"kube_node_status_allocatable", "node_memory_MemAvailable_bytes"}
    used = {name for expr in expressions(dashboard) for name in metric_names(expr)}
    unknown = used - set(exported) - standard
    assert unknown == set(), f"the dashboard queries series nothing exports: {sorted(unknown)}"
    # The operator's own queries ask only for amp4ec series that exist, too.
    assert {n for q in QUERIES.values() for n in metric_names(q) if n.startswith("amp4ec_")} <= set(exported)


def test_dashboard_covers_what_issue_5_asks_for() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    by_metric: dict[str, list[str]] = {}
    exported = exported_series()
    for p in panels(dashboard):
        for t in p.get("targets", []):
            for name in metric_names(t["expr"]):
                by_metric.setdefault(exported.get(name, name), []).append(p["title"])
    for metric in [
        "amp4ec_scheduler_overhead_seconds",  # scheduler overhead (quantiles)
        "amp4ec_stage_phase_seconds",  # per-stage latency
        "amp4ec_stage_requests_total",  # throughput
        "amp4ec_replans_total",  # re-plans
        "amp4ec_node_cpu_limit_cores",  # node capacity
        "amp4ec_node_memory_available_bytes",
        "amp4ec_link_rtt_seconds",  # link RTT
    ]:
        assert metric in by_metric, f"no panel shows {metric}"
    quantiles = [
        t["expr"]
        for p in panels(dashboard)
        for t in p.get("targets", [])
        if "histogram_quantile" in t["expr"]
    ]
    assert any("amp4ec_scheduler_overhead_seconds_bucket" in q for q in quantiles)
    assert any("amp4ec_stage_phase_seconds_bucket" in q for q in quantiles)


def test_dashboard_is_well_formed_for_grafana() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"] == "amp4ec"
    names = {v["name"] for v in dashboard["templating"]["list"]}
    for p in panels(dashboard):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and p["targets"]
        for t in p["targets"]:
            used = set(re.findall(r"\$(\w+)", t["expr"])) - {"__rate_interval", "__interval", "__range"}
            assert used <= names, f"{p['title']}: undefined variables {used - names}"
            assert t["expr"].count("(") == t["expr"].count(")")
