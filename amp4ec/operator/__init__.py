"""The amp4ec operator: ``kopf run -m amp4ec.operator`` registers the hooks and handlers below.

Decides, never executes: imports kopf, the planner and ``wire.v1`` (for ``Monitor.Profile``),
never torch.
"""

from __future__ import annotations

from amp4ec.operator import inferencedeployment, settings, watch
from amp4ec.operator.config import GROUP, PLURAL, VERSION, OperatorConfig

__all__ = ["GROUP", "PLURAL", "VERSION", "OperatorConfig", "inferencedeployment", "settings", "watch"]
