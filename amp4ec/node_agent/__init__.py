"""The node agent: runs a layer range and streams activations to the next shard over gRPC."""

from amp4ec.node_agent.server import AgentServer, create_server
from amp4ec.node_agent.settings import AgentSettings
from amp4ec.wire.stage import StageConfig

__all__ = ["AgentServer", "AgentSettings", "StageConfig", "create_server"]
