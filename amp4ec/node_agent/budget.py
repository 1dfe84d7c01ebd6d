"""One budget for the bytes the agent holds for its callers: requests in work, answers unread.

[Note: held bytes] Windows bound one stream; they do not bound many: 100 streams that never
read hold 100 windows of answers. So every request's frame is charged from arrival until its
answer exists, and every answer until gRPC has taken it. When a charge would pass the
budget, the stream whose oldest answer has waited longest unread (at least ``stall_s``) is
ended RESOURCE_EXHAUSTED and its answers freed; when no stream is stalled within
``2 * stall_s``, the agent is simply busy and the new request is refused RESOURCE_EXHAUSTED
(an Error frame on a stream).
A new call past ``max_streams`` ends the most stalled stream the same way, so streams that
never read cannot keep a valid caller out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Budget", "Holder", "OverBudget"]


class OverBudget(Exception):
    """The agent holds its budget of bytes in work nobody has stopped reading."""


@dataclass(eq=False)
class Holder:
    """What one call holds against the budget."""

    end: Callable[[], None]
    """Ends the call (answers freed as it unwinds); used when it is the most stalled one."""
    held: int = 0
    unread_since: list[float] = field(default_factory=list)
    """Production time of each answer not yet taken by gRPC, oldest first."""
    ending: bool = False


class Budget:
    def __init__(self, limit_bytes: int, stall_s: float = 0.5) -> None:
        self.limit = limit_bytes
        self.stall_s = stall_s
        self.used = 0
        self._holders: set[Holder] = set()

    def open(self, end: Callable[[], None]) -> Holder:
        holder = Holder(end)
        self._holders.add(holder)
        return holder

    def close(self, holder: Holder) -> None:
        self.used -= holder.held
        holder.held = 0
        self._holders.discard(holder)

    async def charge_request(self, holder: Holder, size: int) -> None:
        """Charge a request's frame, waiting up to ``2 * stall_s`` for room (a stalled call's
        memory is freed as it unwinds, and a call may become stalled meanwhile); else raise
        OverBudget: the agent is busy with work its callers do read."""
        deadline = time.monotonic() + 2 * self.stall_s
        while self.used + size > self.limit:
            self.end_most_stalled(exclude=holder)
            if time.monotonic() > deadline:
                raise OverBudget(
                    f"node agent holds {self.used} bytes of requests and unread answers "
                    f"(budget {self.limit}); retry later"
                )
            await asyncio.sleep(0.02)  # re-checked as calls unwind and stalls age
        self._add(holder, size)

    def answer(self, holder: Holder, request_size: int, answer_size: int) -> None:
        """A request became its answer: unread from now until ``taken``."""
        self._add(holder, answer_size - request_size)
        holder.unread_since.append(time.monotonic())
        if self.used > self.limit:
            self.end_most_stalled(exclude=holder)

    def taken(self, holder: Holder, answer_size: int) -> None:
        self._add(holder, -answer_size)
        if holder.unread_since:
            holder.unread_since.pop(0)

    def release(self, holder: Holder, size: int) -> None:
        """A request that ends without an answer held here (refused before work)."""
        self._add(holder, -size)

    def _add(self, holder: Holder, size: int) -> None:
        holder.held += size
        self.used += size

    def end_most_stalled(self, exclude: Holder | None = None) -> bool:
        """End the call whose oldest answer has waited longest (at least ``stall_s``), if any."""
        now = time.monotonic()
        stalled = [
            h
            for h in self._holders
            if h is not exclude
            and not h.ending
            and h.unread_since
            and now - h.unread_since[0] >= self.stall_s
        ]
        if stalled:
            victim = min(stalled, key=lambda h: h.unread_since[0])
            victim.ending = True
            victim.end()
        return bool(stalled)
