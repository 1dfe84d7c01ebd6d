"""The monitor's ``ModelCache`` service: its own gRPC server (mutual TLS) in front of ``model_cache``.

A storage initializer asks for a file by its SHA-256; the namespace is its certificate's
(``authz.cache_policy`` lets in only shard and profiler identities). A hit streams the file in
1 MiB chunks, hashing it again on the way (a file that no longer matches its name is dropped and
the call ends DATA_LOSS: the initializer verifies too, and fetches for itself). A miss makes the
caller the filler of the key or, while another caller fills it, waits for that upload, at most
``wait_s`` (then the caller fetches for itself and uploads nothing). Neither side ever holds more
than a chunk of a file in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc

from amp4ec.errors import InvalidSpec
from amp4ec.node_agent import metrics
from amp4ec.node_agent.authz import cache_namespace, cache_policy
from amp4ec.node_agent.decoding import Undecodable, add_servicer
from amp4ec.node_agent.model_cache import SHA256, Fill, Key, ModelCache, NoRoom, UploadRefused
from amp4ec.node_agent.settings import AgentSettings
from amp4ec.wire import transport
from amp4ec.wire.v1 import agent_pb2, agent_pb2_grpc

__all__ = ["CHUNK_BYTES", "CacheOptions", "CacheServer", "ModelCacheServicer"]

CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class CacheOptions:
    """The monitor's ``--model-cache*`` flags."""

    root: Path
    max_bytes: int
    port: int
    wait_s: float = 600.0
    """How long a caller waits for another's upload of the same key before fetching for itself
    (the storage initializer's own store timeout)."""


class ModelCacheServicer(agent_pb2_grpc.ModelCacheServicer):
    def __init__(self, cache: ModelCache, wait_s: float, node: str) -> None:
        self.cache = cache
        self.wait_s = wait_s
        self.node = node
        metrics.MODEL_CACHE_BYTES.labels(node).set(cache.used)

    def _count(self, result: str) -> None:
        metrics.MODEL_CACHE_REQUESTS.labels(self.node, result).inc()
        metrics.MODEL_CACHE_BYTES.labels(self.node).set(self.cache.used)

    async def Fetch(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.CacheReply]:
        namespace = cache_namespace(transport.peer_identities(context))
        if namespace is None:  # the policy refused it already; this server is never insecure
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, "the model cache needs a namespaced identity"
            )
        first = await _next(requests, context)
        sha = first.sha256 if first is not None and first.WhichOneof("step") == "sha256" else None
        if sha is None or not SHA256.fullmatch(sha):
            got = repr(sha[:80]) if sha is not None else "no sha256 first"
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"sha256: expected 64 lowercase hex digits first, got {got}"
            )
        key = (namespace, sha)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while True:
            hit = self.cache.open(key)
            if hit is not None:
                self._count("hit")
                async for reply in self._send(key, *hit, context):
                    yield reply
                return
            fill = self.cache.filling(key)
            if fill is None:
                break
            self._count("wait")
            try:  # another caller fills it (see model_cache's [Note: one fill per key])
                await asyncio.wait_for(fill.done.wait(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                self._count("timeout")
                yield agent_pb2.CacheReply(miss=agent_pb2.CacheMiss(fill=False))
                return
        fill = self.cache.begin(key)
        self._count("fill")
        uploading = stored = False
        try:
            yield agent_pb2.CacheReply(miss=agent_pb2.CacheMiss(fill=True))
            step = await _next(requests, context)
            if step is None:
                return  # it fetched for itself only (the store failed, or it keeps no copy)
            uploading = True
            try:
                if step.WhichOneof("step") != "size":
                    raise UploadRefused(
                        f"size: expected the file's size first, got {step.WhichOneof('step')}"
                    )
                self.cache.offer(fill, step.size)
                yield agent_pb2.CacheReply(accepted=True)
                await self._receive(fill, requests, context)
            except UploadRefused as exc:
                code = grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(exc, NoRoom) else None
                await context.abort(code or grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            self.cache.commit(fill)
            stored = True
            yield agent_pb2.CacheReply(stored=True)
        finally:
            if uploading:  # refused: a bad upload, or one cut short (the caller went away)
                self._count("stored" if stored else "refused")
            self.cache.release(fill)

    async def _receive(
        self, fill: Fill, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        """The filler's chunks up to ``end``, written to the upload and sealed (UploadRefused)."""
        while (step := await _next(requests, context)) is not None and step.HasField("chunk"):
            await asyncio.to_thread(self.cache.write, fill, step.chunk)
        if step is None:
            raise UploadRefused(f"end: the upload stopped after {fill.received} of {fill.size} bytes")
        if step.WhichOneof("step") != "end":
            raise UploadRefused(f"{step.WhichOneof('step')}: expected chunks, then end")
        await asyncio.to_thread(self.cache.seal, fill)

    async def _send(
        self, key: Key, file: IO[bytes], size: int, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.CacheReply]:
        """The entry's size, then its chunks, checked against its name on the way."""
        digest, sent = hashlib.sha256(), 0
        with file:
            yield agent_pb2.CacheReply(size=size)
            while chunk := await asyncio.to_thread(file.read, CHUNK_BYTES):
                digest.update(chunk)
                sent += len(chunk)
                yield agent_pb2.CacheReply(chunk=chunk)
            if sent != size or digest.hexdigest() != key[1]:
                self.cache.drop(key, file)
                await context.abort(
                    grpc.StatusCode.DATA_LOSS, f"sha256: the cached {key[1]} changed on disk; dropped it"
                )


async def _next(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
    """The caller's next message, or None when it half-closed; an undecodable one is refused."""
    try:
        message = await requests.__anext__()
    except StopAsyncIteration:
        return None
    if isinstance(message, Undecodable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message.describe())
    return message


@dataclass
class CacheServer:
    """The monitor's model cache server, bound (``start`` serves)."""

    server: grpc.aio.Server
    port: int
    cache: ModelCache

    @classmethod
    def create(cls, settings: AgentSettings, options: CacheOptions) -> CacheServer:
        if settings.security.insecure:
            raise InvalidSpec(
                "--model-cache: entries are keyed by the caller's certificate: needs mutual TLS"
            )
        cache = ModelCache(options.root, options.max_bytes)
        # Chunks are 1 MiB: a caller may not make the monitor hold a larger message.
        grpc_options = [o for o in settings.server_options() if o[0] != "grpc.max_receive_message_length"]
        grpc_options.append(("grpc.max_receive_message_length", 2 * CHUNK_BYTES))
        server = transport.server(
            settings.security, cache_policy, grpc_options, maximum_concurrent_rpcs=4 * settings.max_streams
        )
        servicer = ModelCacheServicer(cache, options.wait_s, settings.node)
        add_servicer(agent_pb2_grpc.add_ModelCacheServicer_to_server, servicer, server)
        port = transport.add_port(server, f"{settings.host}:{options.port}", settings.security)
        return cls(server, port, cache)

    async def start(self) -> None:
        await self.server.start()

    async def stop(self, grace: float | None) -> None:
        await self.server.stop(grace)
