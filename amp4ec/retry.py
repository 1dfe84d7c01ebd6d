"""Retry and outlier-ejection policy of the data-plane client: plain data, no I/O.

[Note: retries] Requests are idempotent (a forward has no side effect), so a request that
fails UNAVAILABLE or DEADLINE_EXCEEDED on one pipeline is sent again on another. Two limits
keep retries from turning a fault into an overload:

- a retry budget, as Finagle's: over the last ``window_s`` seconds, retries may not exceed
  ``ratio`` of first attempts plus ``min_per_s`` per second (a reserve for low traffic);
- outlier ejection, as Envoy's: a pipeline that fails ``eject_after`` times in a row takes
  no traffic for ``base_ejection_s`` (doubled with each ejection, up to ``max_ejection_s``),
  then comes back only once its entry answers a health check, on probation: its next
  failure ejects it again.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["RETRIABLE", "Outlier", "RetryBudget", "RetryPolicy", "backoff_s"]

RETRIABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "FAILED_PRECONDITION"})
"""Codes that say the pipeline, not the request, failed (a stage without a range loaded
answers FAILED_PRECONDITION). INVALID_ARGUMENT would fail anywhere: it is not retried."""

Clock = Callable[[], float]


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    """Attempts per request, the first included."""
    budget_ratio: float = 0.2
    """Retries may not exceed this fraction of requests (over ``budget_window_s``)…"""
    budget_min_per_s: float = 10.0
    """…plus this many per second, so a trickle of traffic can still retry."""
    budget_window_s: float = 10.0
    backoff_base_s: float = 0.01
    backoff_max_s: float = 0.25
    """Full-jitter exponential back-off between attempts: uniform(0, min(max, base·2^n))."""
    eject_after: int = 3
    """Consecutive failures that eject a pipeline."""
    base_ejection_s: float = 0.5
    max_ejection_s: float = 30.0
    health_timeout_s: float = 1.0
    """A re-admission health check answered later than this counts as failed."""
    wait_for_pipeline_s: float = 30.0
    """How long a request without a deadline waits for a pipeline while none is admitted
    (a supervisor may be loading a new plan)."""


def backoff_s(attempt: int, policy: RetryPolicy, rng: random.Random | None = None) -> float:
    """Pause before retry number ``attempt`` (1 = the first retry)."""
    cap = min(policy.backoff_max_s, policy.backoff_base_s * 2 ** max(0, attempt - 1))
    return (rng or random).uniform(0, cap)


@dataclass
class RetryBudget:
    """Finagle-style budget: may a retry be sent now? (see [Note: retries])."""

    policy: RetryPolicy = field(default_factory=RetryPolicy)
    clock: Clock = time.monotonic
    _requests: deque[float] = field(default_factory=deque)
    _retries: deque[float] = field(default_factory=deque)

    def record_request(self) -> None:
        now = self.clock()
        self._forget(now)
        self._requests.append(now)

    def _forget(self, now: float) -> None:
        """Drop what left the window (so memory stays bounded by the window's traffic)."""
        for times in (self._requests, self._retries):
            while times and times[0] <= now - self.policy.budget_window_s:
                times.popleft()

    def try_retry(self) -> bool:
        """Withdraw one retry if the budget allows it; False (and nothing withdrawn) if not."""
        now = self.clock()
        self._forget(now)
        allowed = (
            self.policy.budget_ratio * len(self._requests)
            + self.policy.budget_min_per_s * self.policy.budget_window_s
        )
        if len(self._retries) + 1 > math.floor(allowed):
            return False
        self._retries.append(now)
        return True


@dataclass
class Outlier:
    """One pipeline's standing: admitted, or ejected until a health check re-admits it."""

    policy: RetryPolicy = field(default_factory=RetryPolicy)
    clock: Clock = time.monotonic
    consecutive_failures: int = 0
    ejections: int = 0
    ejected_at: float | None = None

    @property
    def admitted(self) -> bool:
        return self.ejected_at is None

    def success(self) -> None:
        self.consecutive_failures = 0

    def failure(self) -> bool:
        """Count a failure; True when it ejects the pipeline now."""
        self.consecutive_failures += 1
        if self.admitted and self.consecutive_failures >= self.policy.eject_after:
            self.ejected_at = self.clock()
            self.ejections += 1
            return True
        return False

    @property
    def ejection_s(self) -> float:
        """How long the current ejection lasts before a health check may end it."""
        return min(self.policy.max_ejection_s, self.policy.base_ejection_s * 2 ** max(0, self.ejections - 1))

    def probe_due_in(self) -> float:
        """Seconds until a health check may re-admit it (0: now)."""
        if self.ejected_at is None:
            return 0.0
        return max(0.0, self.ejected_at + self.ejection_s - self.clock())

    def health_checked(self, serving: bool) -> None:
        """A health check's outcome: re-admitted on probation, or ejected for longer."""
        if self.ejected_at is None:
            return
        if serving:
            self.ejected_at = None
            self.consecutive_failures = self.policy.eject_after - 1  # probation: one failure ejects
        else:
            self.ejected_at = self.clock()
            self.ejections += 1
