"""ProgressSink: what the benchmark reports while it runs (the CLI draws it with rich)."""

from __future__ import annotations

__all__ = ["ProgressSink"]


class ProgressSink:
    """A no-op sink; the CLI subclasses it. ``step`` counts whole measurements (the overall bar),
    ``phase``/``advance`` the requests of the current one, ``note`` prints a line."""

    def phase(self, text: str, total: int | None = None) -> None:
        return None

    def advance(self) -> None:
        return None

    def step(self) -> None:
        return None

    def note(self, text: str) -> None:
        return None
