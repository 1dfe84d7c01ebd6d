"""``amp4ec bench``: the paper's configurations, every strategy and both monoliths, measured in one run.

Reading order: ``configs`` (what runs) → ``results`` (what comes out: frozen dataclasses and
their JSON) → ``amp4ec.loadgen`` (sequential, closed- and open-loop load, shared with
``amp4ec run``) → ``measure`` (one deployed plan → its figures) → ``runner`` (a configuration
on one local cluster) → ``links`` / ``proxy`` (shaped links) → ``report`` / ``markdown`` /
``plots`` (JSON, docs table, PNGs). Nothing here is imported by the rest of amp4ec.
"""

from __future__ import annotations

__all__: list[str] = []
