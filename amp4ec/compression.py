"""A deployment's compression policy (torch-free: the CLI, local mode, bench and operator share it).

``off``: every cut travels raw and the outputs are the monolith's, bit for bit. ``auto``: the
planner compresses a cut (fp16, int8 per channel; ``amp4ec/wire/codec.py``) where the wire
time it saves exceeds its CPU on that link, keeping the estimated relative L2 error of the
final outputs within ``max_error`` (0: nothing lossy). Off by default because compression
changes answers, however little; the run and the bench measure what it changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from amp4ec.errors import InvalidSpec

__all__ = ["COMPRESSION_MODES", "DEFAULT_MAX_ERROR", "Compression"]

COMPRESSION_MODES = ("off", "auto")
DEFAULT_MAX_ERROR = 0.01
"""Bound on the final outputs' relative L2 error under ``auto`` when none is given: above
fp16's (~1e-4 measured on the zoo) and int8's (~1e-3) per cut, well below what moves a top-1."""


@dataclass(frozen=True)
class Compression:
    mode: str = "off"
    max_error: float = DEFAULT_MAX_ERROR
    """Relative L2 error of the final outputs the codecs may introduce (estimated by the planner
    as the sum of each compressed cut's measured error)."""

    def __post_init__(self) -> None:
        if self.mode not in COMPRESSION_MODES:
            raise InvalidSpec(
                f"compression: expected one of {', '.join(COMPRESSION_MODES)}, got {self.mode!r}"
            )
        value = self.max_error
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise InvalidSpec(f"max_output_error: expected a finite relative error ≥ 0, got {value!r}")

    @property
    def enabled(self) -> bool:
        return self.mode == "auto"
