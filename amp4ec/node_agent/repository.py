"""The stage repository: the layer range this agent serves, loaded and swapped make-before-break."""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health, health_pb2

from amp4ec.errors import InvalidSpec, StageNotLoaded
from amp4ec.node_agent.executor import LoadedStage, build_stage
from amp4ec.node_agent.limits import check_batching
from amp4ec.node_agent.settings import AgentSettings
from amp4ec.wire.stage import StageConfig

__all__ = ["StageRepository"]

log = logging.getLogger(__name__)


class StageRepository:
    """The layer range this agent serves; loading a new one swaps it in only when ready.

    Requests hold a reference to the stage they started on, so a swap never breaks them
    (make-before-break within one agent).
    """

    def __init__(self, settings: AgentSettings, health_servicer: health.aio.HealthServicer) -> None:
        self._settings = settings
        self._health = health_servicer
        self._stage: LoadedStage | None = None
        self._load_lock = asyncio.Lock()

    @property
    def current(self) -> LoadedStage:
        if self._stage is None:
            raise StageNotLoaded(f"node agent {self._settings.node} serves no layer range yet")
        return self._stage

    @property
    def batch_requests(self) -> int:
        """The most requests one forward of the stage served now may gather (1: no batching)."""
        stage = self._stage
        return stage.config.max_batch_requests if stage is not None and stage.shard.batch_flexible else 1

    @property
    def accept_from(self) -> frozenset[str]:
        """Identities that may send frames to the stage served now (none while none is)."""
        return frozenset(self._stage.config.accept_from) if self._stage is not None else frozenset()

    def _check_identities(self, config: StageConfig) -> None:
        """Under mutual TLS a stage names who may call it and whom it calls (never "anyone")."""
        if self._settings.security.insecure:
            return
        if config.next_hop and not config.next_hop_identity:
            raise InvalidSpec("next_hop_identity: required with next_hop under mutual TLS")
        if not config.accept_from:
            raise InvalidSpec("accept_from: at least one identity required under mutual TLS")
        for i, phase in enumerate(config.tile_phases):
            for j, peer in enumerate(phase.tiles):
                if peer.address and not peer.identity:
                    raise InvalidSpec(
                        f"tile_phases[{i}].tiles[{j}].identity: required with an address under mutual TLS"
                    )

    async def load(self, config: StageConfig) -> LoadedStage:
        self._check_identities(config)
        check_batching(config.max_batch_requests, config.max_queue_delay_ms, self._settings)
        async with self._load_lock:
            stage = await asyncio.to_thread(build_stage, config)
            self._stage = stage
            await self._health.set("amp4ec.wire.v1.Shard", health_pb2.HealthCheckResponse.SERVING)
            log.info(
                "serving blocks %d..%d of %s (next hop %s)",
                config.first_block,
                config.last_block,
                config.model,
                config.next_hop or "-",
            )
            return stage

    def serve(self, stage: LoadedStage) -> None:
        """Serve an already built stage (the overhead calibration's relay); no health change."""
        self._check_identities(stage.config)
        self._stage = stage

    async def unload(self) -> None:
        self._stage = None
        await self._health.set("amp4ec.wire.v1.Shard", health_pb2.HealthCheckResponse.NOT_SERVING)
