"""The Open Inference Protocol (v2) at a cluster deployment's entry: the stage-0 agent serves it.

[Note: v2 at a cluster entry] Each shard Pod of stage 0 runs the v2 REST and gRPC front door
(``amp4ec.frontdoor``) inside its own agent process, beside amp4ec's ``Shard`` service, and the
deployment's entry Service exposes both ports. A v2 request takes the same path as a frame on
``Shard.Infer``: the agent's bounds and held-bytes budget, its own blocks, then the next hop
(``ShardServicer.submit``), with no extra hop, process or Pod. Why not a separate router Pod
running the front door over amp4ec's client: that is one more Pod per deployment holding torch
(~250 MB), one more hop per request, and it would have to track the entry stages of every plan
itself, where the entry Service's selector already moves make-before-break. What it would add
is retrying a failed request on another pipeline; here a request whose pipeline fails is
answered 503 / UNAVAILABLE (the protocol's "try again") and the operator re-plans around it.

The model's metadata comes from the stage's chain (its first and last cut, cut on the meta
device) and the model's forward signature; its name is the deployment's. TLS is the agent's
own: the stage-0 certificate (whose SANs also name the entry Service, so curl's host check
passes), and a client certificate whose identity the stage accepts frames from (the
deployment's client Secret) is required; ``--insecure`` agents serve v2 in plaintext.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Sequence

import torch

from amp4ec.client import error_from_status
from amp4ec.errors import InvalidSpec, StageNotLoaded
from amp4ec.frontdoor import listen
from amp4ec.frontdoor.door import FrontDoor
from amp4ec.frontdoor.model import V2Error, meta_of_specs
from amp4ec.node_agent.server import AgentServer
from amp4ec.node_agent.settings import AgentSettings
from amp4ec.wire import codec
from amp4ec.wire.v1 import shard_pb2

__all__ = ["StageBackend", "serve_v2"]

_IDS = itertools.count()


class StageBackend:
    """v2 requests into this agent's own data path (see [Note: v2 at a cluster entry])."""

    def __init__(self, agent: AgentServer) -> None:
        self._agent = agent

    def ready(self) -> bool:
        try:
            return self._agent.repository.current.config.stage == 0
        except StageNotLoaded:
            return False

    async def infer(
        self, inputs: Sequence[torch.Tensor], deadline_s: float | None
    ) -> tuple[torch.Tensor, ...]:
        deadline = int((time.time() + deadline_s) * 1000) if deadline_s else 0
        frame = shard_pb2.Frame(
            request_id=f"v2-{next(_IDS)}", tensors=codec.encode_all(inputs), deadline_unix_ms=deadline
        )
        answer = await self._agent.shard.submit(frame)
        if answer.error.code == "RESOURCE_EXHAUSTED":
            raise V2Error("busy", answer.error.message)
        if answer.error.code:
            raise error_from_status(answer.error.code, answer.error.message)
        return codec.decode_all(answer.tensors)


async def serve_v2(agent: AgentServer, settings: AgentSettings) -> listen.Listeners:
    """Start the v2 listeners of the loaded entry stage (``--v2-http-port``, ``--v2-grpc-port``)."""
    if settings.v2_http_port is None or settings.v2_grpc_port is None:
        raise InvalidSpec("--v2-http-port and --v2-grpc-port: the v2 front door needs both")
    try:
        stage = agent.repository.current
    except StageNotLoaded:
        raise InvalidSpec("--v2-http-port: the v2 front door needs a stage (--model)") from None
    if stage.config.stage != 0:
        raise InvalidSpec(
            f"--v2-http-port: only the entry stage serves v2, this is stage {stage.config.stage}"
        )
    meta = meta_of_specs(
        settings.v2_model_name or re.sub(r"[^A-Za-z0-9_.-]", "_", stage.config.model.rsplit(":", 1)[-1]),
        stage.input_names,
        [(s.shape, s.dtype) for s in stage.model_inputs],
        [(s.shape, s.dtype) for s in stage.model_outputs],
        stage.shard.batch_flexible,
        settings.max_batch,
    )
    door = FrontDoor(meta, StageBackend(agent), max_request_bytes=settings.max_message_bytes)
    repository = agent.repository
    authorise = None if settings.security.insecure else (lambda peers: bool(peers & repository.accept_from))
    return await listen.start(
        door, settings.host, settings.v2_http_port, settings.v2_grpc_port, settings.security, authorise
    )
