"""A tiled plan in the operator, as plain dicts: status says which rows run where, the stage's
Pod gets its phases as flags addressing its tile Pods' Services, each tile Pod its own rows."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from amp4ec import pki
from amp4ec.node_agent.cli import parse_args
from amp4ec.operator.config import OperatorConfig
from amp4ec.operator.decide import as_plan
from amp4ec.operator.desired import desired_objects, entry_service
from amp4ec.operator.planstatus import PlanRecord, plan_record
from amp4ec.operator.profiles import ModelCosts
from amp4ec.operator.reconcile import Deps
from amp4ec.operator.spec import parse_spec
from amp4ec.planner import LayerProfile, NodeCapacity, TileRows, evaluate, plan
from tests.operator.test_hardening import Capacities, Profiles, _step
from tests.operator.test_shared_nodes import kube_with

H = 32
NODES = [NodeCapacity(n, 1.0, 1 << 30, speed=1.0, overhead_ms=0.2) for n in ("edge-a", "edge-b", "edge-c")]
CPU = {"edge-a": 1.0, "edge-b": 0.75, "edge-c": 0.5}


def _blocks() -> list[LayerProfile]:
    conv = TileRows(H, H, tuple(max(0, r - 1) for r in range(H)), tuple(min(H, r + 2) for r in range(H)), 0.5)
    act = 16 * H * H * 4
    convs = [LayerProfile(f"c{i}", 10**8, 50_000, act, 12.0, 2 * act, tile=conv) for i in range(4)]
    return [*convs, LayerProfile("head", 10**6, 4_000, 40, 0.5, act)]


def _tiled(tls: bool = True) -> tuple[Any, PlanRecord, OperatorConfig]:
    spec = parse_spec({"model": {"name": "mobilenet_v2"}, "inputShape": [1, 3, H, H], "objective": "latency"})
    chosen = plan(_blocks(), NODES, objective="latency", input_bytes=3 * H * H * 4)
    assert chosen.stages[0].tiles, chosen
    return spec, plan_record(spec, chosen, CPU), OperatorConfig(tls=tls)


def _args(pod: dict[str, Any]) -> list[str]:
    return pod["spec"]["containers"][0]["args"]


def _parse(pod: dict[str, Any]) -> Any:
    """The agent's own parse of a Pod's flags (TLS paths, which exist only in the Pod, dropped)."""
    args, out = iter(_args(pod)), ["--insecure"]
    for a in args:
        if a.startswith("--tls-"):
            next(args)
        elif a != "--insecure":
            out.append(a)
    return parse_args(out)


def test_the_plans_status_says_which_rows_run_on_which_node_and_round_trips() -> None:
    _, record, _ = _tiled()
    (stage,) = record.to_status()["stages"]
    tiles = stage["tiles"]
    assert [n["node"] for n in tiles["nodes"]] == ["edge-b", "edge-c"]
    assert [n["cpu"] for n in tiles["nodes"]] == [0.75, 0.5]
    for phase in tiles["phases"]:
        rows = phase["rows"]
        assert rows[0]["node"] == "edge-a" and rows[0]["start"] == 0 and rows[-1]["stop"] == H
        assert all(a["stop"] == b["start"] for a, b in itertools.pairwise(rows))
    again = PlanRecord.from_status(record.to_status())
    assert again is not None and again.to_status() == record.to_status()
    assert again.stages[0].tiles == record.stages[0].tiles
    assert set(record.nodes) == {"edge-a", "edge-b", "edge-c"}
    assert len(record.shards) == 3


def test_a_stored_tiled_plan_is_re_priced_tiled() -> None:
    """decide.as_plan keeps the phases, so re-planning prices the deployed plan as chosen."""
    _, record, _ = _tiled()
    again = evaluate(as_plan(record), _blocks(), NODES, input_bytes=3 * H * H * 4)
    assert again.latency_ms == pytest.approx(record.latency_ms, abs=1e-3)


@pytest.mark.parametrize("tls", [True, False], ids=["mutual TLS", "plaintext"])
def test_the_stage_pod_scatters_to_its_tile_pods_services(tls: bool) -> None:
    spec, record, config = _tiled(tls)
    objs = desired_objects("mnv2", "ml", spec, record, config)
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    pods = [o for o in objs if o["kind"] == "Pod"]
    assert len(services) == len(pods) == 3
    own, *tiles = pods
    _, config_own, _, _ = _parse(own)
    assert config_own is not None and config_own.tile_phases and not config_own.tile_only
    identity = pki.stage_identity("ml", "mnv2", 0) if tls else ""
    for phase in config_own.tile_phases:
        assert phase.own.node == "edge-a"
        for k, peer in enumerate(phase.others, start=1):
            service = f"mnv2-{record.id}-p0s0-t{k}"
            assert peer.address == f"{service}.ml.svc:50051" and peer.identity == identity
            # The Service selects exactly that tile's Pod.
            selector = services[service]["spec"]["selector"].items()
            assert [p["metadata"]["name"] for p in pods if selector <= p["metadata"]["labels"].items()] == [
                service
            ]
    entry = entry_service("mnv2", "ml", record.id, config)["spec"]["selector"].items()
    assert [p for p in pods if entry <= p["metadata"]["labels"].items()] == [own]
    for k, (pod, node) in enumerate(zip(tiles, ("edge-b", "edge-c"), strict=True), start=1):
        settings, tile, _, _ = _parse(pod)
        assert tile is not None and tile.tile_only and settings.node == node
        assert pod["spec"]["nodeSelector"] == {"kubernetes.io/hostname": node}
        assert pod["metadata"]["labels"]["amp4ec.io/stage"] == f"0-t{k}"
        assert pod["spec"]["containers"][0]["resources"]["requests"]["cpu"] == f"{round(CPU[node] * 1000)}m"
        assert tile.accept_from == ((identity,) if tls else ())
        assert [p.tiles[0].node for p in tile.tile_phases] == [node] * len(config_own.tile_phases)
        assert [p.tiles[0].rows for p in tile.tile_phases] == [
            next(t.rows for t in p.tiles if t.node == node) for p in config_own.tile_phases
        ]
        assert "--v2-http-port" not in _args(pod) and "--next-hop" not in _args(pod)
        if tls:  # a tile presents its stage's identity: the stage's leaf
            tls_volume = next(v for v in own["spec"]["volumes"] if v["name"] == "tls")
            assert tls_volume in pod["spec"]["volumes"]


class _TileableProfiles(Profiles):
    """The profiler's answer for a model whose convolutions tile well (``_blocks``)."""

    COSTS = ModelCosts(blocks=tuple(_blocks()), input_bytes=3 * H * H * 4, reference_ms=10.0)


@pytest.mark.parametrize("tiles", [True, False], ids=["tiles", "no tiles"])
def test_spec_tiles_decides_whether_the_operator_plans_tiles(tiles: bool) -> None:
    kube = kube_with(*CPU)
    deps = Deps(
        kube=kube, prometheus=Capacities(), profiler=_TileableProfiles(), config=OperatorConfig(tls=False)
    )  # type: ignore[arg-type]
    spec = {
        "model": {"name": "mobilenet_v2"},
        "inputShape": [1, 3, H, H],
        "objective": "latency",
        "nodeSelector": {"amp4ec.io/edge": "true"},
        "tiles": tiles,
    }
    status: dict[str, Any] = {}
    asyncio.run(_step(deps, "lat", "uid-t", spec, status))
    record = status.get("rollout") or status.get("plan")
    assert record, status
    assert any(s.get("tiles") for s in record["stages"]) is tiles, record["stages"]
