"""ShardStream retired under a waiting request: the request is told UNAVAILABLE (retriable),
never a gRPC usage error from the closed channel (which escaped ``amp4ec run`` once)."""

from __future__ import annotations

import asyncio

import pytest

from amp4ec.errors import ShardUnavailable
from amp4ec.wire.stream import ShardStream
from amp4ec.wire.transport import TransportSecurity
from amp4ec.wire.v1 import shard_pb2


def test_a_request_waiting_to_write_when_the_stream_is_retired_is_unavailable() -> None:
    async def main() -> None:
        stream = ShardStream("127.0.0.1:1", [], TransportSecurity.plaintext(), peer="stage 0 on node0")
        async with stream._write_lock:  # another request is writing
            waiting = asyncio.create_task(stream.call(shard_pb2.Frame(request_id="r1")))
            while stream.in_flight == 0:  # the request is queued behind the writer
                await asyncio.sleep(0)
            await stream.close()  # retired by a re-plan meanwhile
        with pytest.raises(ShardUnavailable, match="stage 0 on node0 unavailable: retired"):
            await waiting
        assert stream.in_flight == 0
        assert not await stream.serving(1.0), "a retired stream is not serving"

    asyncio.run(main())
