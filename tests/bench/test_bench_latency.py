"""The latency configurations: defined for both models, and rendered with the ratio to the target."""

from __future__ import annotations

from amp4ec.bench.configs import ALL_CONFIGURATIONS, configurations
from amp4ec.bench.json_form import from_json
from amp4ec.bench.latency import PLANS, TARGET
from amp4ec.bench.markdown import _config
from amp4ec.bench.results import LatencyResult
from amp4ec.cli.bench import bench as bench_command
from amp4ec.slicing import ModelSource


def test_latency_configurations_cover_both_models_on_the_papers_nodes() -> None:
    (only,) = [o for o in bench_command.params if o.name == "only"]
    assert tuple(only.type.choices) == ALL_CONFIGURATIONS  # what --only accepts is what runs
    found = {
        c.name: c for c in configurations(ModelSource("mobilenet_v2"), only=("latency", "latency-resnet50"))
    }
    assert {c.source.spec for c in found.values()} == {"mobilenet_v2", "resnet50"}
    for config in found.values():
        assert config.latency and config.strategies == PLANS
        assert [n.cpu for n in config.nodes] == [1.0, 0.6, 0.4]
        assert config.links is None


def test_the_shaped_variant_runs_on_100_mbit_links_with_a_2_ms_round_trip() -> None:
    (config,) = configurations(ModelSource("mobilenet_v2"), only=("latency-100mbit",))
    assert config.latency and config.strategies == PLANS and config.source.spec == "mobilenet_v2"
    assert config.links is not None and (config.links.rate_mbit, 2 * config.links.delay_ms) == (100, 2)


def _plan(single: float, alone: float, tiles: list[dict]) -> dict:
    return {
        "plan": [{"node": "node0", "first_block": 0, "last_block": 20, "tiles": tiles}],
        "tiled": bool(tiles),
        "notes": [],
        "max_abs_diff": 0.0,
        "predicted_latency_ms": single,
        "single_ms": {"p50": single, "p95": single, "mean": single, "max": single},
        "single_p50_ms": single,
        "alone_single_p50_ms": alone,
        "ratio_vs_alone": single / alone,
        "single_samples_ms": [single],
        "alone_samples_ms": [alone],
        "saturation_rps": 10.0,
        "open_loop": {
            "rate_rps": 5.0,
            "completed": 1,
            "p50_ms": 1.0,
            "p95_ms": 2.0,
            "mean_ms": 1.0,
            "max_ms": 2.0,
        },
    }


def test_the_section_names_phases_and_says_whether_the_target_is_met() -> None:
    phase = {"first_block": 0, "last_block": 3, "nodes": ["node0", "node1", "node2"], "rows": [[0, 5]]}
    config = {
        "name": "latency",
        "title": "t",
        "status": "ok",
        "kind": "latency",
        "model": "mobilenet_v2",
        "input_shape": [1, 3, 224, 224],
        "scale_factor": 0.8,
        "nodes": [{"name": "node0", "cpu": 0.8}],
        "target": TARGET,
        "plans": {"latency_objective": _plan(60.0, 100.0, [phase]), "fastest_node": _plan(101.0, 100.0, [])},
        "cpu_limits": "cgroup",
        "ratio": 0.6,
    }
    text = "\n".join(_config(from_json(LatencyResult, config)))
    assert "node0[0–20] tiles 0–3 on node0/node1/node2" in text
    assert "| 0.60× |" in text and "target ≤ 0.7×: met" in text
    config["ratio"] = 0.9
    assert "not met" in "\n".join(_config(from_json(LatencyResult, config)))
