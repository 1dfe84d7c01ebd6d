"""The data-plane client: tensors in, model outputs back, over one or more pipelines.

Each request goes to the admitted pipeline expected to answer first: its requests in flight
times its measured interval between answers, plus its idle latency (join the shortest
expected delay, ``amp4ec.dispatch``), so a plan of several pipelines or replicas of unequal
speed is served as one endpoint. A request
that fails because its pipeline failed is retried on another one, within a retry budget;
a pipeline that keeps failing is ejected until a health check re-admits it (see
[Note: retries] in amp4ec.retry). The client enforces ``deadline_s`` itself and every hop
enforces it too (the frame carries it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from amp4ec.dispatch import ServiceEstimate, choose
from amp4ec.errors import Amp4ecError, DeadlineExceeded, InvalidSpec, ShardUnavailable, StageNotLoaded
from amp4ec.retry import RETRIABLE, Outlier, RetryBudget, RetryPolicy, backoff_s
from amp4ec.wire import codec
from amp4ec.wire.liveness import KEEPALIVE_OPTIONS, deadline_unix_ms
from amp4ec.wire.stream import ShardStream
from amp4ec.wire.transport import TransportSecurity
from amp4ec.wire.v1 import shard_pb2

__all__ = ["Client", "ClientStats", "Endpoint", "Result", "RetryPolicy", "error_from_status"]

log = logging.getLogger(__name__)
MiB = 1024 * 1024


@dataclass(frozen=True)
class Endpoint:
    """A pipeline's entry shard: where to send, and how errors name it."""

    address: str
    name: str = ""
    """e.g. ``stage 0 on node0``; default: the address."""
    identity: str = ""
    """Under mutual TLS, the identity the entry must present (see amp4ec/pki.py)."""
    latency_ms: float = field(default=0.0, compare=False)
    """The pipeline's predicted time for one request on an idle system (0 = unknown): where
    dispatch starts before answers teach it (see amp4ec.dispatch). Not part of the identity,
    so a new plan's prediction never replaces a serving pipeline."""
    interval_ms: float = field(default=0.0, compare=False)
    """The pipeline's predicted slowest stage: time between its answers when busy (0 = unknown)."""

    @property
    def label(self) -> str:
        return self.name or f"entry {self.address}"


@dataclass(frozen=True)
class Result:
    outputs: tuple[torch.Tensor, ...]
    timings: tuple[shard_pb2.StageTiming, ...]
    """Per-stage timing of this request, first stage first."""
    latency_s: float
    entry: str
    """The entry shard that served it."""
    request_bytes: int
    response_bytes: int
    attempts: int = 1
    """1 = answered on the first try; more = retried."""


@dataclass
class ClientStats:
    requests: int = 0
    answered: int = 0
    failed: int = 0
    retries: int = 0
    """Attempts after the first, over all requests."""
    retried_requests: int = 0
    """Answered requests that needed more than one attempt."""
    ejections: list[tuple[float, str, str]] = field(default_factory=list)
    """(monotonic time, pipeline, last error) of every ejection."""
    readmissions: list[tuple[float, str]] = field(default_factory=list)
    recent_errors: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    """The last failed attempts' errors (retried or not)."""


def error_from_status(code: str, message: str) -> Amp4ecError:
    """An error frame or gRPC status back into the amp4ec error tree."""
    kind = {
        "INVALID_ARGUMENT": InvalidSpec,
        "UNAVAILABLE": ShardUnavailable,
        "FAILED_PRECONDITION": StageNotLoaded,
        "DEADLINE_EXCEEDED": DeadlineExceeded,
    }.get(code, Amp4ecError)
    return kind(f"{code}: {message}")


class _Pipeline:
    def __init__(
        self,
        endpoint: Endpoint,
        options: list[tuple[str, int]],
        policy: RetryPolicy,
        security: TransportSecurity,
    ) -> None:
        self.endpoint = endpoint
        self.stream = ShardStream(endpoint.address, options, security, endpoint.identity, endpoint.label)
        self.outlier = Outlier(policy)
        self.service = ServiceEstimate(endpoint.latency_ms, endpoint.interval_ms)
        self.probe: asyncio.Task[None] | None = None


class Client:
    """Send tensors to the entry shards of one or more pipelines."""

    def __init__(
        self,
        entries: Sequence[str | Endpoint],
        security: TransportSecurity,
        max_message_bytes: int = 256 * MiB,
        policy: RetryPolicy | None = None,
    ) -> None:
        """``security``: this client's identity; under mutual TLS every entry is an ``Endpoint``
        naming the identity its server must present."""
        if not entries:
            raise InvalidSpec("entries: expected at least one host:port")
        self._security = security
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            *KEEPALIVE_OPTIONS,
        ]
        self.policy = policy or RetryPolicy()
        self.budget = RetryBudget(self.policy)
        self.stats = ClientStats()
        self._pipelines: list[_Pipeline] = []
        self._changed = asyncio.Event()
        """Set whenever a pipeline is admitted or added: requests waiting for one look again."""
        self._retired: set[asyncio.Task[None]] = set()
        self._gone: str | None = None
        """Why no pipeline will come back (see ``give_up``); requests then fail at once."""
        self._ids = itertools.count()
        self.set_entries(entries)

    @property
    def entries(self) -> list[Endpoint]:
        return [p.endpoint for p in self._pipelines]

    @property
    def estimates(self) -> dict[str, ServiceEstimate]:
        """What dispatch has learnt of each pipeline, by its entry's label."""
        return {p.endpoint.label: p.service for p in self._pipelines}

    def in_flight(self, address: str) -> int:
        return sum(p.stream.in_flight for p in self._pipelines if p.endpoint.address == address)

    def set_entries(self, entries: Sequence[str | Endpoint]) -> None:
        """Serve from these pipelines from now on. New ones are admitted at once; removed ones
        are retired: requests still waiting on them are answered UNAVAILABLE and retried."""
        wanted = [e if isinstance(e, Endpoint) else Endpoint(e) for e in entries]
        unnamed = [e.address for e in wanted if not e.identity]
        if unnamed and not self._security.insecure:
            raise InvalidSpec(
                f"entries: {unnamed[0]} needs the identity its server must present (mutual TLS)"
            )
        if wanted:
            self._gone = None
        keep = {p.endpoint: p for p in self._pipelines}
        self._pipelines = [
            keep.pop(e, None) or _Pipeline(e, self._options, self.policy, self._security) for e in wanted
        ]
        for gone in keep.values():
            self._retire(gone)
        self._wake()

    def give_up(self, reason: str) -> None:
        """No pipeline will be added (nothing can serve): requests waiting for one, and new ones,
        fail at once with ``reason`` instead of waiting out their deadline."""
        self.set_entries([])
        self._gone = reason
        self._wake()

    def _retire(self, pipeline: _Pipeline) -> None:
        if pipeline.probe is not None:
            pipeline.probe.cancel()
        task = asyncio.get_running_loop().create_task(pipeline.stream.close())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def infer(self, tensors: Sequence[torch.Tensor], deadline_s: float | None = None) -> Result:
        """One answer for ``tensors``; retried on other pipelines when one fails (see module doc).

        ``deadline_s`` bounds the whole request, retries included: every hop is told it and
        this call raises DeadlineExceeded when it passes."""
        self.stats.requests += 1
        self.budget.record_request()
        encoded = codec.encode_all(tensors)
        request_id = str(next(self._ids))
        start = time.perf_counter()
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        failures: list[str] = []
        tried: set[int] = set()
        for attempt in range(1, self.policy.max_attempts + 1):
            if attempt > 1:
                if not self.budget.try_retry():
                    self.stats.failed += 1
                    raise ShardUnavailable(f"{failures[-1]} (not retried: the retry budget is spent)")
                self.stats.retries += 1
                await asyncio.sleep(backoff_s(attempt - 1, self.policy))
            pipeline = await self._pick(tried, deadline, failures)
            tried.add(id(pipeline))
            frame = shard_pb2.Frame(request_id=request_id, tensors=encoded)
            if deadline is not None:
                frame.deadline_unix_ms = deadline_unix_ms(deadline - time.monotonic())
            sent, warm, ahead = time.monotonic(), pipeline.stream.warm, pipeline.stream.in_flight
            try:
                answer = await pipeline.stream.call(frame)
            except ShardUnavailable as e:
                answer = shard_pb2.Frame(error=shard_pb2.Error(code="UNAVAILABLE", message=str(e)))
            code = answer.error.code
            if not code:
                pipeline.outlier.success()
                if warm:  # else its round trip includes connecting (TLS handshake): not the shard's
                    pipeline.service.answered(sent, time.monotonic(), ahead)
                self.stats.answered += 1
                self.stats.retried_requests += attempt > 1
                return Result(
                    outputs=codec.decode_all(answer.tensors),
                    timings=tuple(answer.timings),
                    latency_s=time.perf_counter() - start,
                    entry=pipeline.endpoint.address,
                    request_bytes=frame.ByteSize(),
                    response_bytes=answer.ByteSize(),
                    attempts=attempt,
                )
            if code not in RETRIABLE:
                self.stats.failed += 1
                raise error_from_status(code, answer.error.message)
            failures.append(f"{code}: {answer.error.message}")
            self.stats.recent_errors.append(failures[-1])
            self._failed(pipeline, failures[-1])
            if deadline is not None and time.monotonic() >= deadline:
                self.stats.failed += 1
                raise DeadlineExceeded(f"DEADLINE_EXCEEDED: after {attempt} attempt(s); last: {failures[-1]}")
        self.stats.failed += 1
        raise ShardUnavailable(f"UNAVAILABLE: request failed after {len(tried)} attempt(s): {failures[-1]}")

    async def _pick(self, tried: set[int], deadline: float | None, failures: list[str]) -> _Pipeline:
        """The admitted pipeline expected to answer first, preferring one not tried yet; waits while none
        is admitted (a supervisor may be loading a new plan), up to the deadline."""
        limit = deadline if deadline is not None else time.monotonic() + self.policy.wait_for_pipeline_s
        while True:
            admitted = [p for p in self._pipelines if p.outlier.admitted]
            fresh = [p for p in admitted if id(p) not in tried] or admitted
            if fresh:
                return fresh[choose([(p.service, p.stream.in_flight) for p in fresh], time.monotonic())]
            if self._gone is not None and not self._pipelines:
                self.stats.failed += 1
                raise ShardUnavailable(f"UNAVAILABLE: {self._gone}")
            left = limit - time.monotonic()
            if left <= 0:
                self.stats.failed += 1
                last = f"; last error: {failures[-1]}" if failures else ""
                names = ", ".join(p.endpoint.label for p in self._pipelines) or "none"
                kind = DeadlineExceeded if deadline is not None else ShardUnavailable
                code = "DEADLINE_EXCEEDED" if deadline is not None else "UNAVAILABLE"
                raise kind(f"{code}: no healthy pipeline to send to (ejected: {names}){last}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def _failed(self, pipeline: _Pipeline, error: str) -> None:
        if pipeline not in self._pipelines:
            return  # retired meanwhile: its failures say nothing about the pipelines left
        if pipeline.outlier.failure():
            self.stats.ejections.append((time.monotonic(), pipeline.endpoint.label, error))
            log.warning(
                "ejected %s after %d failures: %s", pipeline.endpoint.label, self.policy.eject_after, error
            )
            pipeline.probe = asyncio.get_running_loop().create_task(self._probe(pipeline))

    async def _probe(self, pipeline: _Pipeline) -> None:
        """Health-check an ejected pipeline's entry until it is re-admitted."""
        while not pipeline.outlier.admitted:
            await asyncio.sleep(pipeline.outlier.probe_due_in())
            pipeline.outlier.health_checked(await pipeline.stream.serving(self.policy.health_timeout_s))
        self.stats.readmissions.append((time.monotonic(), pipeline.endpoint.label))
        pipeline.probe = None
        self._wake()

    async def close(self) -> None:
        for pipeline in self._pipelines:
            if pipeline.probe is not None:
                pipeline.probe.cancel()
            await pipeline.stream.close()
        self._pipelines = []
        if self._retired:
            await asyncio.gather(*self._retired, return_exceptions=True)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
