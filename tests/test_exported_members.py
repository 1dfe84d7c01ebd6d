"""The public surface of each package is pinned: a change to it is a deliberate edit here."""

import importlib

import pytest

PUBLIC = {
    "amp4ec": {"__version__"},
    "amp4ec.planner": {
        "CodecProfile",
        "LayerProfile",
        "Link",
        "NodeCapacity",
        "OBJECTIVES",
        "Pin",
        "Pipeline",
        "Plan",
        "Prediction",
        "STRATEGIES",
        "SchedulerHistory",
        "Stage",
        "TileGroup",
        "TileRows",
        "evaluate",
        "plan",
        "reference_overhead_ms",
        "replan_reason",
        "should_replan",
    },
    "amp4ec.slicing": {
        "Block",
        "BlockChain",
        "LoadedModel",
        "ModelSource",
        "Shard",
        "TensorSpec",
        "chain_input_bytes",
        "load_model",
        "profile_chain",
        "split_model",
    },
    "amp4ec.node_agent": {"AgentServer", "AgentSettings", "StageConfig", "create_server"},
    "amp4ec.local": {
        "LIMIT_MODES",
        "LocalCluster",
        "NodeSpec",
        "RunConfig",
        "RunReport",
        "parse_nodes",
        "run",
    },
    "amp4ec.models": {"ZOO", "ZooEntry", "mobilenet_v2", "resnet18", "resnet50", "vit_b_16", "vit_tiny"},
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_exported_members(name: str) -> None:
    module = importlib.import_module(name)
    assert set(module.__all__) == PUBLIC[name]
    for member in module.__all__:
        assert hasattr(module, member), f"{name}.__all__ names {member}, which does not exist"
