"""The benchmark's configuration names, torch-free: the CLI checks ``--only`` against them before
anything heavy is imported, and ``configs`` builds one configuration per name."""

from __future__ import annotations

__all__ = ["CONFIGURATION_NAMES"]

CONFIGURATION_NAMES = (
    "standard",
    "scale-down",
    "scale-up",
    "big-model",
    "slow-links",
    "failover",
    "multi-tenant",
    "batching",
    "latency",
    "latency-resnet50",
    "latency-100mbit",
)
