"""Failing fast: gRPC keepalive settings and request deadlines, shared by client and agents.

[Note: keepalive] A peer that stops (SIGSTOP, a frozen VM, a cable pulled) leaves its TCP
connection open, so without keepalive a stream to it waits forever. Every channel pings
its peer every second and drops the connection when a ping goes unanswered for two, so a
silent peer is noticed within ~3 s and everything waiting on it fails UNAVAILABLE. Servers
must allow pings that often (gRPC's default answers them with GOAWAY "too_many_pings").
A connection attempt to a silent peer is given up after 2 s (gRPC's default: 20 s), so a
stage whose next hop hangs answers UNAVAILABLE instead of queueing on the connect.
"""

from __future__ import annotations

import time

__all__ = ["KEEPALIVE_OPTIONS", "deadline_unix_ms", "remaining_s"]

KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    # client side: ping every second, also while idle, and give up after 2 s without an ack
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # an unanswered ping otherwise counts as lost only after grpc's 60 s ping timeout
    ("grpc.http2.ping_timeout_ms", 2000),
    # server side: accept those pings without counting strikes
    ("grpc.http2.min_ping_interval_without_data_ms", 500),
    ("grpc.http2.max_ping_strikes", 0),
    # reconnecting: a connect to a silent peer times out in 2 s; retry it soon after
    ("grpc.min_reconnect_backoff_ms", 2000),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def deadline_unix_ms(timeout_s: float) -> int:
    """The wall-clock deadline a frame carries, ``timeout_s`` from now."""
    return int((time.time() + timeout_s) * 1000)


def remaining_s(deadline_ms: int) -> float | None:
    """Seconds left before a frame's deadline (≤ 0: passed); None when it has none."""
    if not deadline_ms:
        return None
    return deadline_ms / 1000 - time.time()
