"""Local mode: the planner and data plane with node agents as local processes."""

from amp4ec.local.cluster import LIMIT_MODES, LocalCluster, NodeSpec, parse_nodes
from amp4ec.local.run import RunConfig, RunReport, run

__all__ = ["LIMIT_MODES", "LocalCluster", "NodeSpec", "RunConfig", "RunReport", "parse_nodes", "run"]
