"""The shard Pods the operator renders under mutual TLS: each mounts only its own stage's leaf,
is told who may call it and whom it calls, has no control port, and is probed on the
plaintext health-only port; their arguments parse with the agent's own command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from amp4ec import pki
from amp4ec.node_agent.cli import parse_args
from amp4ec.operator.config import OperatorConfig
from amp4ec.operator.desired import TLS_DIR, desired_objects
from amp4ec.operator.planstatus import plan_record
from amp4ec.operator.podsecurity import SHARD_GID
from amp4ec.operator.spec import parse_spec
from amp4ec.planner.types import Pipeline, Plan, Prediction, Stage


def _pods(config: OperatorConfig) -> list[dict[str, Any]]:
    spec = parse_spec({"model": {"name": "mobilenet_v2"}, "inputShape": [1, 3, 64, 64]})
    stages = (Stage("edge-a", 0, 3, 2.0, 0.1, 10 << 20), Stage("edge-b", 4, 9, 3.0, 0.2, 20 << 20))
    plan = Plan("throughput", "optimal", (Pipeline(stages),), Prediction((2.1, 3.2), 3.2, 6.0, 312.5))
    record = plan_record(spec, plan, {"edge-a": 1.0, "edge-b": 0.5})
    return [o for o in desired_objects("mnv2", "ml", spec, record, config) if o["kind"] == "Pod"]


def test_each_stage_pins_its_identities_and_mounts_only_its_own_key(tmp_path: Path) -> None:
    ca = pki.CertificateAuthority.create()
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    config = OperatorConfig()
    for stage, pod in enumerate(_pods(config)):
        ca.issue(pki.stage_identity("ml", "mnv2", stage)).write(tmp_path, "tls")
        container = pod["spec"]["containers"][0]
        (volume,) = [v for v in pod["spec"]["volumes"] if "secret" in v]
        assert volume["secret"]["secretName"] == "mnv2-shard-tls" and volume["secret"]["defaultMode"] == 0o440
        assert {i["key"] for i in volume["secret"]["items"]} == {
            "ca.crt",
            f"stage-{stage}.crt",
            f"stage-{stage}.key",
        }
        assert pod["spec"]["securityContext"]["fsGroup"] == SHARD_GID
        assert {"name": "tls", "mountPath": TLS_DIR, "readOnly": True} in container["volumeMounts"]
        assert volume["name"] == "tls"
        settings, config_, _, monitor = parse_args(
            [a.replace(TLS_DIR, str(tmp_path)) for a in container["args"]]
        )
        assert config_ is not None and monitor is None
        assert settings.security.identity == pki.stage_identity("ml", "mnv2", stage)
        assert settings.control_port is None  # nothing on the network can re-target it
        upstream = pki.client_identity("ml", "mnv2") if stage == 0 else pki.stage_identity("ml", "mnv2", 0)
        assert config_.accept_from == (upstream,)
        assert config_.next_hop_identity == (pki.stage_identity("ml", "mnv2", 1) if stage == 0 else "")
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == settings.health_port == config.health_port


def test_insecure_operator_renders_plaintext_shards() -> None:
    for pod in _pods(OperatorConfig(tls=False)):
        container = pod["spec"]["containers"][0]
        settings, _, _, _ = parse_args(container["args"])
        assert settings.security.insecure and not [v for v in pod["spec"].get("volumes", []) if "secret" in v]
        assert container["readinessProbe"]["grpc"]["port"] == settings.port
