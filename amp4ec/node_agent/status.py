"""amp4ec errors → gRPC status codes: the one place the agent maps them.

Used for unary calls (``context.abort``) and for per-request Error frames on streams,
so a bad request never ends a stream other requests share.
"""

from __future__ import annotations

import logging

import grpc

from amp4ec.errors import DeadlineExceeded, InvalidSpec, ShardUnavailable, StageNotLoaded
from amp4ec.node_agent.budget import OverBudget
from amp4ec.wire.v1 import shard_pb2

__all__ = ["DeadlineExceeded", "error_frame", "status_of"]

log = logging.getLogger(__name__)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, InvalidSpec):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, StageNotLoaded):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, ShardUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, OverBudget):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    # Anything else is our bug: log it in full, tell the caller only that it happened.
    log.exception("internal error while serving a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error in the node agent ({type(exc).__name__})"


def error_frame(request_id: str, exc: BaseException) -> shard_pb2.Frame:
    code, message = status_of(exc)
    return shard_pb2.Frame(request_id=request_id, error=shard_pb2.Error(code=code.name, message=message))
