"""Load generators over a ``Client``: one request at a time, a closed loop at a fixed concurrency
(``amp4ec run``, the bench), open-loop Poisson arrivals (the bench)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from amp4ec.client import Client, Result
from amp4ec.errors import Amp4ecError

__all__ = ["OpenLoop", "closed_loop", "open_loop", "sequential"]

Tick = Callable[[], None]


def _noop() -> None:
    return None


async def sequential(
    client: Client, inputs: Sequence[torch.Tensor], count: int, tick: Tick = _noop
) -> list[Result]:
    """``count`` requests, each sent when the previous one has answered (an idle system's latency)."""
    results = []
    for _ in range(count):
        results.append(await client.infer(inputs))
        tick()
    return results


async def closed_loop(
    client: Client,
    inputs: Sequence[torch.Tensor],
    count: int,
    concurrency: int,
    on_done: Callable[[Result], None] | None = None,
    on_error: Callable[[Amp4ecError], None] | None = None,
    deadline_s: float | None = None,
) -> tuple[list[Result], float]:
    """Keep ``concurrency`` requests in flight until ``count`` are done; (answers, wall seconds).

    ``on_done`` sees each answer as it comes. With ``on_error`` a failed request is reported and
    the loop goes on; without, the first failure ends the loop and is raised."""
    remaining = iter(range(count))
    results: list[Result] = []

    async def worker() -> None:
        for _ in remaining:
            try:
                result = await client.infer(inputs, deadline_s=deadline_s)
            except Amp4ecError as e:
                if on_error is None:
                    raise
                on_error(e)
                continue
            results.append(result)
            if on_done is not None:
                on_done(result)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return results, time.perf_counter() - start


@dataclass
class OpenLoop:
    """What an open-loop run saw. Latency counts from the scheduled arrival, so a client that
    falls behind its schedule (``late``) shows up in the latencies instead of hiding them."""

    rate_rps: float
    sent: int
    latencies_ms: list[float] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    dropped: int = 0
    """Requests that failed or had no answer within the drop timeout."""
    late: int = 0
    """Requests the client sent more than ``late_ms`` after their scheduled arrival."""
    wall_s: float = 0.0
    """From the first scheduled arrival to the last answer."""

    @property
    def completed(self) -> int:
        return len(self.latencies_ms)

    @property
    def achieved_rps(self) -> float:
        return self.completed / self.wall_s if self.wall_s > 0 else 0.0


async def open_loop(
    client: Client,
    inputs: Sequence[torch.Tensor],
    count: int,
    rate_rps: float,
    *,
    seed: int = 0,
    drop_after_s: float = 10.0,
    late_ms: float = 10.0,
    tick: Tick = _noop,
) -> OpenLoop:
    """``count`` requests with exponential gaps (Poisson arrivals at ``rate_rps``), never waiting
    for answers before sending; each is dropped after ``drop_after_s`` without an answer."""
    if rate_rps <= 0:
        raise ValueError(f"rate_rps: expected > 0, got {rate_rps}")
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(count):
        t += rng.expovariate(rate_rps)
        arrivals.append(t)
    stats = OpenLoop(rate_rps=rate_rps, sent=count)
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.01
    last_done = start

    async def one(scheduled: float) -> None:
        nonlocal last_done
        try:
            result = await asyncio.wait_for(client.infer(inputs), drop_after_s)
        except (asyncio.TimeoutError, Amp4ecError):
            stats.dropped += 1
        else:
            now = loop.time()
            last_done = max(last_done, now)
            stats.latencies_ms.append((now - scheduled) * 1000)
            stats.results.append(result)
        tick()

    tasks = []
    for at in arrivals:
        scheduled = start + at
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if (loop.time() - scheduled) * 1000 > late_ms:
            stats.late += 1
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    stats.wall_s = max(0.0, last_done - (start + arrivals[0])) if arrivals else 0.0
    return stats
