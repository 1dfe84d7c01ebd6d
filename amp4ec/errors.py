"""The amp4ec exception tree: one place where every boundary maps errors from.

    Amp4ecError                      base; the CLI prints its message as one red line
    ├── InvalidSpec                  user input is wrong (a field, a flag, a model spec)
    │   ├── ModelNotFound            unknown zoo name, missing file, bad module:factory
    │   └── ShapeMismatch            a tensor's dtype/shape/bytes differ from what a stage expects
    ├── PlanInfeasible               no placement satisfies the constraints (memory, zero nodes)
    ├── StageNotLoaded               a request reached an agent that serves no stage
    ├── ShardUnavailable             a peer agent cannot be reached (transient)
    └── DeadlineExceeded             a request's deadline passed before it was answered

The node agent maps them in one place, ``amp4ec.node_agent.status.status_of`` (for unary
calls and per-request Error frames alike): InvalidSpec/ShapeMismatch to INVALID_ARGUMENT,
StageNotLoaded to FAILED_PRECONDITION, ShardUnavailable to UNAVAILABLE, DeadlineExceeded
to DEADLINE_EXCEEDED, and anything else to INTERNAL with a generic message. The client
(``amp4ec.client.error_from_status``) maps the codes back; the CLI prints any of them as one line.
"""

from __future__ import annotations

import re

__all__ = [
    "Amp4ecError",
    "DeadlineExceeded",
    "InvalidSpec",
    "ModelNotFound",
    "PlanInfeasible",
    "ShapeMismatch",
    "ShardUnavailable",
    "StageNotLoaded",
    "one_line",
]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(text: str, limit: int = 300) -> str:
    """Another library's error text as one line: terminal escapes dropped, whitespace collapsed,
    and past ``limit`` characters cut after a whole sentence (torch's advice runs to paragraphs)."""
    flat = " ".join(_ANSI.sub("", text).split())
    if len(flat) <= limit:
        return flat
    cut = flat.rfind(". ", 0, limit)
    return (flat[: cut + 1] if cut > 0 else flat[:limit]) + " …"


class Amp4ecError(Exception):
    """Base class of every error amp4ec raises on purpose."""


class InvalidSpec(Amp4ecError, ValueError):
    """User input is wrong; the message names the field and what was expected."""


class ModelNotFound(InvalidSpec):
    """A model spec names nothing loadable (zoo name, file or factory)."""


class ShapeMismatch(InvalidSpec):
    """A tensor does not match what a stage expects ("expected X, actual Y")."""


class PlanInfeasible(Amp4ecError):
    """No partition of the model fits the given nodes."""


class StageNotLoaded(Amp4ecError):
    """The agent has no stage loaded for the request."""


class ShardUnavailable(Amp4ecError):
    """A peer shard could not be reached."""


class DeadlineExceeded(Amp4ecError):
    """A request's deadline passed before it was answered (queued, computing or forwarding)."""
