"""Register gRPC servicers so that an undecodable request gets a clear answer, not a hang.

[Note: undecodable requests] grpc's server parses each request with the generated
``FromString`` before the handler sees it. When that raises, grpc python (1.85) ends a
unary call with UNKNOWN and leaves a stream's handler waiting for a message that never
comes (the call hangs). ``add_servicer`` registers the generated handlers with a parser
that returns ``Undecodable`` instead of raising: unary handlers then answer
INVALID_ARGUMENT before the servicer runs, and a stream's servicer gets the ``Undecodable``
item in its request iterator and answers it with an Error frame.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

__all__ = ["Undecodable", "add_servicer"]


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes are not a valid message of the method's request type."""

    message_type: str
    reason: str

    def describe(self) -> str:
        return f"request: expected a valid {self.message_type} message, got undecodable bytes ({self.reason})"


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    owner = getattr(parse, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    type_name = descriptor.full_name if descriptor is not None else "protobuf"

    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except (DecodeError, ValueError, RuntimeError) as e:  # RuntimeError: upb's recursion limit
            return Undecodable(type_name, f"{type(e).__name__}: {e}"[:200])

    return deserialize


def _refusing(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.describe())
        return await behavior(request, context)

    return unary


class _Capture:
    """Stands in for the server while a generated ``add_*_to_server`` registers its handlers."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        pass  # the same handlers arrive through add_registered_method_handlers

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.services[service] = handlers


def add_servicer(add: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server) -> None:
    """``add(servicer, server)`` for a generated ``add_*_to_server``, with lenient parsing."""
    capture = _Capture()
    add(servicer, capture)
    for service, handlers in capture.services.items():
        patched = {}
        for name, handler in handlers.items():
            changes: dict[str, Any] = {"request_deserializer": _lenient(handler.request_deserializer)}
            if handler.unary_unary is not None:
                changes["unary_unary"] = _refusing(handler.unary_unary)
            patched[name] = handler._replace(**changes)  # type: ignore[attr-defined]
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, patched),))
        server.add_registered_method_handlers(service, patched)
