"""The storage initializer's side of the node-wide model cache (the monitor's ``ModelCache``).

``fetch_through_cache`` asks its node's monitor for the file by its SHA-256, under the Pod's own
certificate (the monitor keys entries by the namespace in it, ``node_agent/model_cache.py``):

- a hit is streamed into the Pod's volume and verified here as a fetched file is
  (``fetch.place``: the digest, a zip for a ``.pt2``); the store is not asked;
- a miss runs the plain fetch; when the monitor names this caller the entry's filler, the
  verified file is then uploaded, chunk by chunk (the monitor checks its SHA-256 again);
- the cache never fails a Pod: a monitor that is down, restarting or refusing, or a cached copy
  that does not verify, means fetching from the store as without a cache. Only the store's own
  failures (``FetchError``) end the initializer.

Reached as ``--cache HOST:PORT``: the chart's node-local Service (``internalTrafficPolicy:
Local``, so the kube-proxy of each node forwards only to that node's monitor). grpc is imported
here only, so ``fetch.py`` stays standard library when no cache is configured.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from amp4ec import pki
from amp4ec.errors import InvalidSpec
from amp4ec.operator.fetch import FetchError, partial, place
from amp4ec.wire import transport
from amp4ec.wire.v1 import agent_pb2, agent_pb2_grpc

__all__ = ["CHUNK_BYTES", "fetch_through_cache"]

CHUNK_BYTES = 1 << 20
_OPTIONS = [("grpc.max_receive_message_length", 4 * CHUNK_BYTES)]
STALL_S = 60.0
"""A monitor that sends no chunk of a hit, or takes no chunk of an upload, for this long is
given up on (the Pod fetches for itself, or keeps its fetched copy)."""


def _note(message: str) -> None:
    print(f"storage initializer: node cache: {message}", file=sys.stderr, flush=True)


def fetch_through_cache(
    address: str,
    tls: tuple[Path | None, Path | None, Path | None],
    uri: str,
    out: Path,
    sha256: str,
    store: Callable[[], str],
    wait_s: float = 600.0,
) -> tuple[str, str]:
    """``out`` from the node's cache at ``address`` (mutual TLS with the Pod's ``tls`` = ca,
    cert, key), or from ``store()`` (the plain fetch); returns (hex SHA-256, where it came
    from). ``wait_s`` bounds the wait for the monitor's first answer (it may be waiting for
    another Pod's upload of the same file)."""
    try:
        security = transport.TransportSecurity.from_files(*tls, flags="--tls-")
    except InvalidSpec as exc:
        _note(f"{exc}; fetching from the store")
        return store(), "the store"
    return asyncio.run(_exchange(address, security, uri, out, sha256, store, wait_s))


async def _exchange(
    address: str,
    security: transport.TransportSecurity,
    uri: str,
    out: Path,
    sha256: str,
    store: Callable[[], str],
    wait_s: float,
) -> tuple[str, str]:
    try:
        async with transport.channel(
            address, security, expect_identity=pki.MONITOR, options=_OPTIONS
        ) as channel:
            call: Any = agent_pb2_grpc.ModelCacheStub(channel).Fetch()
            await call.write(agent_pb2.CacheRequest(sha256=sha256))
            first = await asyncio.wait_for(call.read(), wait_s)
            if first is grpc.aio.EOF or first.WhichOneof("step") not in ("size", "miss"):
                raise _Unexpected(f"answered {first!r} first")
            if first.HasField("size"):
                try:
                    return await _receive(call, first.size, uri, out, sha256), "the node cache"
                except FetchError as exc:  # a bad copy: the store has the file
                    _note(f"the cached copy did not verify ({exc}); fetching from the store")
                    return await asyncio.to_thread(store), "the store"
            digest = await asyncio.to_thread(store)  # its FetchError is the initializer's
            if not first.miss.fill:
                return digest, "the store (another Pod's upload took too long)"
            try:
                return digest, await _upload(call, out)
            except (grpc.aio.AioRpcError, asyncio.TimeoutError, _Unexpected) as exc:
                _note(f"not stored: {_why(exc)}")  # the file is fetched and verified all the same
            return digest, "the store"
    except (grpc.aio.AioRpcError, asyncio.TimeoutError, OSError, _Unexpected) as exc:
        _note(f"{address}: {_why(exc)}; fetching from the store")
    return await asyncio.to_thread(store), "the store"


class _Unexpected(Exception):
    """The monitor answered out of turn (another version of the protocol)."""


def _why(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer in time"
    return str(exc)


async def _receive(call: Any, size: int, uri: str, out: Path, sha256: str) -> str:
    """A hit's chunks into ``out``, hashed on the way and verified before they get its name."""
    tmp = partial(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    digest, got = hashlib.sha256(), 0
    try:
        with tmp.open("wb") as f:
            while (reply := await asyncio.wait_for(call.read(), STALL_S)) is not grpc.aio.EOF:
                if not reply.HasField("chunk") or got + len(reply.chunk) > size:
                    raise _Unexpected(f"sent {reply.WhichOneof('step')} past {got} of {size} bytes")
                f.write(reply.chunk)
                digest.update(reply.chunk)
                got += len(reply.chunk)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if got != size:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{uri}: the cached copy ended after {got} of {size} bytes")
    return place(tmp, out, uri, sha256, digest.hexdigest())


async def _upload(call: Any, out: Path) -> str:
    """The verified file, announced by its size, chunk by chunk (each write waits for flow
    control: one chunk in memory at a time); where the file came from, for the log."""
    await asyncio.wait_for(call.write(agent_pb2.CacheRequest(size=out.stat().st_size)), STALL_S)
    reply = await asyncio.wait_for(call.read(), STALL_S)  # no room: refused before any chunk
    if reply is grpc.aio.EOF or not reply.accepted:
        raise _Unexpected(f"answered {reply!r} to the size")
    with out.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            await asyncio.wait_for(call.write(agent_pb2.CacheRequest(chunk=chunk)), STALL_S)
    await asyncio.wait_for(call.write(agent_pb2.CacheRequest(end=True)), STALL_S)
    await call.done_writing()
    reply = await asyncio.wait_for(call.read(), STALL_S)  # after the monitor's hash and fsync
    if reply is grpc.aio.EOF or not reply.stored:
        raise _Unexpected(f"answered {reply!r} to the upload")
    return "the store, now in the node cache"
