"""Dispatch by expected completion: what each pipeline takes, learnt from its answers. Plain data.

The client sends a request to the pipeline expected to answer first, ``latency + n ×
interval`` with ``n`` its requests in flight (see [Note: expected completion] in
amp4ec.planner.load). Both terms start from the plan's prediction and follow the answers
(exponentially weighted moving averages):

- a request sent to a pipeline with nothing else in flight met an idle pipeline: its round
  trip is a ``latency`` sample;
- any other waited behind those ahead of it: the time from the previous answer (or, if that
  came earlier, from when the request could first have been answered, ``sent + latency -
  interval``) is an ``interval`` sample. With dynamic batching, answers come in bursts: a
  batch's gap and its zeros average to the time per request.

Under a CPU quota the gaps include the time a node sits throttled, so ``interval`` learns the
rate the quota sustains, not the speed of one burst. Failed attempts teach nothing (ejection
handles them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from amp4ec.planner.load import expected_completion_ms

__all__ = ["ALPHA", "STALE_S", "ServiceEstimate", "choose"]

ALPHA = 0.2
"""Weight of a new sample: the estimates follow a change within ~10 answers."""
STALE_S = 2.0
"""An idle pipeline not heard from this long is tried again (see ``choose``)."""


@dataclass
class ServiceEstimate:
    """One pipeline's idle latency and busy interval, in ms (0 = not known yet)."""

    latency_ms: float = 0.0
    interval_ms: float = 0.0
    alpha: float = ALPHA
    answers: int = 0
    last_done: float = -math.inf
    """When the latest answer came (seconds, the caller's clock)."""

    @property
    def known(self) -> bool:
        return self.latency_ms > 0 or self.interval_ms > 0

    def expected_ms(self, in_flight: int) -> float:
        interval = self.interval_ms or self.latency_ms
        return expected_completion_ms(self.latency_ms or interval, interval, in_flight)

    def answered(self, sent_at: float, done_at: float, ahead: int) -> None:
        """Learn from one answer: sent and answered at these times (seconds, one clock), with
        ``ahead`` other requests in flight on the pipeline when it was sent."""
        if ahead == 0:
            self.latency_ms = self._ewma(self.latency_ms, (done_at - sent_at) * 1000)
        else:
            earliest = sent_at + max(0.0, self.latency_ms - self.interval_ms) / 1000
            gap = done_at - max(self.last_done, earliest)
            self.interval_ms = self._ewma(self.interval_ms, max(0.0, gap) * 1000)
        self.last_done = max(self.last_done, done_at)
        self.answers += 1

    def _ewma(self, old: float, sample: float) -> float:
        return sample if old <= 0 else old + self.alpha * (sample - old)


def choose(candidates: Sequence[tuple[ServiceEstimate, int]], now: float) -> int:
    """Index of the candidate (estimate, requests in flight) expected to answer first.

    A pipeline with no estimate yet is priced optimistically, as answering at once behind its
    requests in flight at the known ones' average interval (1 ms when none is known): tried
    at once, without taking every request until its first answer. So is an idle pipeline
    not answered for ``STALE_S`` (a seed from the plan stays until answers replace it): only
    answers correct an estimate, and one made slow by a passing stall (a neighbour's burst)
    would otherwise keep its pipeline idle for ever. Ties go to the fewest in flight, then
    to the first."""
    if not candidates:
        raise ValueError("candidates: expected at least one pipeline")
    known = [e.interval_ms or e.latency_ms for e, _ in candidates if e.known]
    interval = math.fsum(known) / len(known) if known else 1.0

    def key(i: int) -> tuple[float, int, int]:
        estimate, in_flight = candidates[i]
        recent = not estimate.answers or now - estimate.last_done < STALE_S  # a seed stays
        fresh = estimate.known and (in_flight or recent)
        expected = estimate.expected_ms(in_flight) if fresh else in_flight * interval
        return expected, in_flight, i

    return min(range(len(candidates)), key=key)
