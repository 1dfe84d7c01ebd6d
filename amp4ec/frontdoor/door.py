"""The protocol-independent part of the front door: a model's metadata, its readiness, and
inference through a backend with amp4ec's errors turned into v2 errors.

A backend is what answers: the data-plane client over every pipeline (``ClientBackend``,
``amp4ec serve``) or, in a cluster, the entry stage's own agent (``amp4ec.node_agent.entry``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from amp4ec import __version__
from amp4ec.client import Client
from amp4ec.errors import Amp4ecError, DeadlineExceeded, InvalidSpec, ShardUnavailable, StageNotLoaded
from amp4ec.frontdoor.model import ModelMeta, V2Error

__all__ = ["SERVER_NAME", "Backend", "ClientBackend", "FrontDoor", "MiB"]

MiB = 1024 * 1024
SERVER_NAME = "amp4ec"
EXTENSIONS = ("binary_tensor_data",)
"""Protocol extensions served (REST); ServerMetadata lists them."""


class Backend(Protocol):
    """What the front door sends checked inputs to."""

    def ready(self) -> bool:
        """True while a request would find a pipeline to run on."""
        ...

    async def infer(
        self, inputs: Sequence[torch.Tensor], deadline_s: float | None
    ) -> tuple[torch.Tensor, ...]:
        """The model's outputs; amp4ec errors (or V2Error) on failure."""
        ...


class ClientBackend:
    """Every pipeline through the data-plane client (which dispatches, retries and fails over)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def ready(self) -> bool:
        """Ready while the client has a pipeline to send to (none during a re-plan that
        retired every pipeline, or after the survivors could not hold the model)."""
        return bool(self.client.entries)

    async def infer(
        self, inputs: Sequence[torch.Tensor], deadline_s: float | None
    ) -> tuple[torch.Tensor, ...]:
        return (await self.client.infer(inputs, deadline_s=deadline_s)).outputs


class FrontDoor:
    """One served model behind a backend."""

    def __init__(
        self,
        meta: ModelMeta,
        backend: Backend,
        deadline_s: float | None = 30.0,
        max_request_bytes: int = 64 * MiB,
        max_json_bytes: int = 16 * MiB,
    ) -> None:
        self.meta = meta
        self.backend = backend
        self.deadline_s = deadline_s
        self.max_request_bytes = max_request_bytes
        """Bound on a request body (REST) or message (gRPC): refused 413 / RESOURCE_EXHAUSTED."""
        self.max_json_bytes = max_json_bytes
        """Bound on a REST request's JSON part: parsed JSON numbers take ~10× their text in
        memory, so large tensors go as binary data (refused 413 naming the extension)."""
        self.version = __version__

    def ready(self) -> bool:
        return self.backend.ready()

    async def infer(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        try:
            return await self.backend.infer(inputs, self.deadline_s)
        except DeadlineExceeded as e:
            raise V2Error("deadline", str(e)) from None
        except (ShardUnavailable, StageNotLoaded) as e:
            raise V2Error("unavailable", str(e)) from None
        except InvalidSpec as e:
            raise V2Error("invalid", str(e)) from None
        except Amp4ecError as e:
            raise V2Error("internal", str(e)) from None
