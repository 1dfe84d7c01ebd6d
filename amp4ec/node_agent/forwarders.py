"""The forwarder pool: one stream per next hop (or tile peer), renewed with the agent's leaf."""

from __future__ import annotations

import asyncio
import logging
import time

from amp4ec.node_agent.settings import AgentSettings
from amp4ec.wire.stream import ShardStream

__all__ = ["RENEWAL_CHECK_S", "ForwarderPool"]

log = logging.getLogger(__name__)
RENEWAL_CHECK_S = 60.0
"""How often a stage looks for a renewed certificate on disk (three stat calls)."""


class ForwarderPool:
    """Streams to the hops this agent sends to, keyed by (address, identity) and kept open."""

    def __init__(self, settings: AgentSettings) -> None:
        self._settings = settings
        self._forwarders: dict[tuple[str, str], ShardStream] = {}
        self._security = settings.security
        self._checked = time.monotonic()
        self._retiring: set[asyncio.Task[None]] = set()

    def forwarder(self, target: str, identity: str, peer: str | None = None) -> ShardStream:
        """The stream to the next hop at ``target``, which must present ``identity`` (mutual TLS);
        ``peer`` names it in errors."""
        self._refresh_security()
        key = (target, identity)
        if key not in self._forwarders:
            self._forwarders[key] = ShardStream(
                target, self._settings.grpc_options(), self._security, identity, peer
            )
        return self._forwarders[key]

    def _refresh_security(self) -> None:
        """At most every ``RENEWAL_CHECK_S``: a renewed leaf on disk replaces the forwarders, whose
        channels would otherwise present the old one until it expires (transport.py's Note)."""
        now = time.monotonic()
        if now - self._checked < RENEWAL_CHECK_S:
            return
        self._checked = now
        fresh = self._security.refreshed()
        if fresh is self._security:
            return
        log.info("certificate renewed on disk: new connections to next hops use it")
        self._security = fresh
        old, self._forwarders = self._forwarders, {}
        for stream in old.values():
            task = asyncio.create_task(stream.close_when_idle())
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        for forwarder in self._forwarders.values():
            await forwarder.close()
