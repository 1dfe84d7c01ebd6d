"""Dynamic batching: requests waiting for a stage gathered into one forward, answers split back.

[Note: dynamic batching] A forward worker that becomes free takes the oldest waiting request
and, when its stage allows batches (``max_batch_requests`` > 1, a batch-flexible chain), the
requests for the same stage waiting behind it, up to ``max_batch_requests`` requests and
the agent's ``--max-batch`` rows. With ``max_queue_delay_ms`` the first request may wait
that long for more to come (never past its deadline); with 0 (the default) a batch is only
what was already waiting, so an idle stage adds no delay and a busy one does more work per
CPU second (MobileNetV2 on one thread: 18.1 ms an image alone, 15.6 at batch 2).

Each request keeps its own fate: a request whose caller gave up (cancelled, deadline passed
while queued) is left out before the forward; one that fails to decode or does not match the
stage's inputs fails alone; if the batched forward itself fails, each request is run alone so
only the one that cannot run fails. Every request still holds its own window slot and budget
bytes in the servicer (see [Note: window until read]), so batching changes no bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from amp4ec.errors import DeadlineExceeded
from amp4ec.wire import codec
from amp4ec.wire.v1 import shard_pb2

__all__ = ["BatchQueue", "Outcome", "StreamShare", "Waiting", "run_batch", "stream_share"]

Answer = tuple[list[shard_pb2.Tensor], shard_pb2.StageTiming]
Outcome = Answer | BaseException
"""One request's answer (encoded outputs and timing) or its error."""


@dataclass
class Waiting:
    """One request queued for a stage (``stage`` is a ``LoadedStage``: duck-typed, no import cycle)."""

    stage: object
    frame: shard_pb2.Frame
    arrived: float
    """perf_counter() at arrival, for the timing's queue time."""
    future: asyncio.Future[Answer]
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        shapes = [t.shape for t in self.frame.tensors]
        self.rows = int(shapes[0][0]) if shapes and len(shapes[0]) else 1

    @property
    def expired(self) -> bool:
        deadline = self.frame.deadline_unix_ms
        return bool(deadline) and time.time() * 1000 > deadline


class BatchQueue:
    """Requests waiting for the forward workers, taken in arrival order, in batches."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        """The agent's ``--max-batch``: rows one forward may hold, all its requests together."""
        self._waiting: deque[Waiting] = deque()
        self._arrived: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def put(self, item: Waiting) -> None:
        self._waiting.append(item)
        if self._arrived is not None:
            self._arrived.set()

    async def _next_arrival(self, timeout: float | None) -> None:
        self._arrived = self._arrived or asyncio.Event()
        self._arrived.clear()
        if timeout is None:
            await self._arrived.wait()
            return
        with contextlib.suppress(asyncio.TimeoutError):  # 3.10: not the builtin yet
            await asyncio.wait_for(self._arrived.wait(), timeout)

    async def take(self) -> list[Waiting]:
        """The next batch: its first request the oldest still wanted; more as its stage allows."""
        first = None
        while first is None:
            while not self._waiting:
                await self._next_arrival(None)
            candidate = self._waiting.popleft()
            if not candidate.future.done():  # else its caller gave up while it waited
                first = candidate
        config = first.stage.config  # type: ignore[attr-defined]
        flexible = first.stage.shard.batch_flexible and not config.tile_only  # type: ignore[attr-defined]
        limit = config.max_batch_requests if flexible else 1  # a tile stage answers its own rows: alone
        batch, rows = [first], first.rows
        give_up = time.monotonic() + config.max_queue_delay_ms / 1000
        if first.frame.deadline_unix_ms:
            give_up = min(give_up, time.monotonic() + first.frame.deadline_unix_ms / 1000 - time.time())
        while len(batch) < limit:
            rows = self._gather(first.stage, batch, rows, limit)
            left = give_up - time.monotonic()
            if len(batch) >= limit or left <= 0:
                break
            await self._next_arrival(left)
        return batch

    def _gather(self, stage: object, batch: list[Waiting], rows: int, limit: int) -> int:
        """Move waiting requests for ``stage`` into ``batch`` (in order, within the limits)."""
        kept: deque[Waiting] = deque()
        while self._waiting and len(batch) < limit:
            item = self._waiting.popleft()
            if item.future.done():
                continue
            if item.stage is stage and rows + item.rows <= self.max_rows:
                batch.append(item)
                rows += item.rows
            else:
                kept.append(item)
        self._waiting.extendleft(reversed(kept))
        return rows


def run_batch(batch: list[Waiting], idle_factor: float = 0.0) -> list[Outcome]:
    """Run ``batch`` (requests for one stage) as one forward, in a worker thread."""
    stage = batch[0].stage
    shard, index = stage.shard, stage.config.stage  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    outcomes: list[Outcome | None] = [None] * len(batch)
    ready: list[tuple[int, tuple[torch.Tensor, ...], float]] = []
    for i, item in enumerate(batch):
        started = time.perf_counter()
        try:
            if item.expired:  # queued past its deadline: its caller has given up, spend no CPU on it
                raise DeadlineExceeded(
                    f"request {item.frame.request_id!r} passed its deadline queued at stage {index}"
                )
            # Shapes first: decoding an int8 frame allocates 4x its bytes, so only what the stage takes.
            shard.check_inputs(codec.signatures(item.frame.tensors))
            tensors = codec.decode_all(item.frame.tensors)
        except Exception as exc:
            outcomes[i] = exc
        else:
            ready.append((i, tensors, time.perf_counter() - started))
    t1 = time.perf_counter()
    outputs = _forward(shard, [tensors for _, tensors, _ in ready])
    t2 = time.perf_counter()
    for (i, _, decode_s), out in zip(ready, outputs, strict=True):
        if isinstance(out, BaseException):
            outcomes[i] = out
            continue
        started = time.perf_counter()
        encoded = codec.encode_all(out, stage.config.output_codec)  # type: ignore[attr-defined]
        timing = shard_pb2.StageTiming(
            stage=index,
            queue_us=int((t0 - batch[i].arrived) * 1e6),
            decode_us=int(decode_s * 1e6),
            forward_us=int((t2 - t1) * 1e6),
            encode_us=int((time.perf_counter() - started) * 1e6),
            batch=len(ready),
        )
        outcomes[i] = (encoded, timing)
    if idle_factor:
        time.sleep((time.perf_counter() - t0) * idle_factor)
    return [o if o is not None else RuntimeError("request left unanswered") for o in outcomes]


def _forward(
    shard: Callable[..., tuple[torch.Tensor, ...]], inputs: list[tuple[torch.Tensor, ...]]
) -> list[tuple[torch.Tensor, ...] | BaseException]:
    """Outputs per request: one forward of them all, split back by rows; each alone if that fails."""
    if len(inputs) > 1:
        rows = [t[0].shape[0] for t in inputs]
        try:
            with torch.inference_mode():
                joined = shard(*(torch.cat(parts) for parts in zip(*inputs, strict=True)))
            if all(o.dim() and o.shape[0] == sum(rows) for o in joined):
                split = [o.split(rows) for o in joined]
                return [tuple(parts) for parts in zip(*split, strict=True)]
        except Exception:
            pass  # one request may be what broke it: each runs alone below, so only it fails
    out: list[tuple[torch.Tensor, ...] | BaseException] = []
    for tensors in inputs:
        try:
            with torch.inference_mode():
                out.append(shard(*tensors))
        except Exception as exc:
            out.append(exc)
    return out


def stream_share(workers: int, batch: int) -> int:
    """Requests one stream may have queued or running for the forward workers: one per worker
    without batching; with it, a batch running per worker and a full batch waiting behind each
    (else the next batch would form only from what arrives after the running one ends, and a
    lone stream would alternate full batches with batches of one)."""
    return workers if batch <= 1 else 2 * workers * batch


class StreamShare:
    """[Note: fair streams] One inbound stream's share of the forward workers: at most
    ``limit()`` of its requests queued or running at once (``stream_share``, read on every
    entry, so a stage loaded with another batch applies at once). A request on a new stream
    then waits for at most a batch or two per other busy stream, not for every request those
    streams have sent, and a stream still fills whole batches by itself."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self._used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def __aenter__(self) -> None:
        while self._used >= self._limit():
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self._used += 1

    async def __aexit__(self, *exc: object) -> None:
        self._used -= 1
        while self._waiters:  # wake the next one still waiting (a cancelled one is skipped)
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break
