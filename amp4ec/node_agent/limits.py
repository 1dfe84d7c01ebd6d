"""Bounds on what one request may make the agent do; each refusal is InvalidSpec naming the field.

Checked before any work or allocation, so a request over a bound costs the agent nothing
but its bytes (which the gRPC message-size limit bounds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from amp4ec.errors import InvalidSpec, ShapeMismatch
from amp4ec.node_agent.settings import AgentSettings
from amp4ec.slicing.sources import ensure_factory_allowed
from amp4ec.wire.stage import MAX_BATCH_REQUESTS, MAX_QUEUE_DELAY_MS
from amp4ec.wire.v1 import agent_pb2, shard_pb2

__all__ = ["check_batching", "check_echo", "check_frame", "check_profile", "check_stage_spec"]


def check_frame(frame: shard_pb2.Frame, settings: AgentSettings) -> None:
    if len(frame.request_id) > settings.max_request_id_chars:
        raise InvalidSpec(
            f"request_id: expected at most {settings.max_request_id_chars} characters, "
            f"actual {len(frame.request_id)}"
        )
    for i, tensor in enumerate(frame.tensors):
        if len(tensor.shape) and tensor.shape[0] > settings.max_batch:
            raise ShapeMismatch(
                f"tensors[{i}].shape[0]: expected a batch of at most {settings.max_batch} "
                f"(the agent's --max-batch), actual {tensor.shape[0]}"
            )


def check_stage_spec(spec: agent_pb2.StageSpec, settings: AgentSettings, field: str = "") -> None:
    ensure_factory_allowed(spec.model, settings.allowed_factories, f"{field}model")
    _check_shape(spec.input_shape, settings, f"{field}input_shape")
    check_batching(spec.max_batch_requests, spec.max_queue_delay_ms, settings, field)


def check_batching(requests: int, delay_ms: float, settings: AgentSettings, field: str = "") -> None:
    """A stage's dynamic batching within the agent's bounds: a batch is one forward of up to
    ``--max-batch`` rows, so no more requests than that (0 and 1 both mean none)."""
    if not 0 <= requests <= settings.max_batch:
        raise InvalidSpec(
            f"{field}max_batch_requests: expected 0 to {settings.max_batch} (the agent's --max-batch), "
            f"actual {requests}"
        )
    if not 0 <= delay_ms <= MAX_QUEUE_DELAY_MS:  # NaN fails too
        raise InvalidSpec(
            f"{field}max_queue_delay_ms: expected 0 to {MAX_QUEUE_DELAY_MS:g} ms, actual {delay_ms!r}"
        )


MAX_PROFILE_BATCHES = 8
"""Most batch sizes one Profile may time: each costs about that many forwards per pass."""


def check_profile(request: agent_pb2.ProfileRequest, settings: AgentSettings) -> None:
    if not 0 <= request.repeats <= settings.max_profile_repeats:
        raise InvalidSpec(
            f"repeats: expected 0 (the default) to {settings.max_profile_repeats}, actual {request.repeats}"
        )
    if len(request.batch_sizes) > MAX_PROFILE_BATCHES:
        raise InvalidSpec(
            f"batch_sizes: expected at most {MAX_PROFILE_BATCHES} sizes, actual {len(request.batch_sizes)}"
        )
    for i, size in enumerate(request.batch_sizes):
        if not 2 <= size <= MAX_BATCH_REQUESTS:
            raise InvalidSpec(f"batch_sizes[{i}]: expected 2 to {MAX_BATCH_REQUESTS}, actual {size}")
    check_stage_spec(request.model, settings, "model.")


def check_echo(probe: agent_pb2.Probe, settings: AgentSettings) -> None:
    limit = settings.max_echo_bytes
    if len(probe.payload) > limit:
        raise InvalidSpec(f"payload: expected at most {limit} bytes, actual {len(probe.payload)}")
    if not 0 <= probe.reply_bytes <= limit:
        raise InvalidSpec(f"reply_bytes: expected 0 to {limit}, actual {probe.reply_bytes}")


def _check_shape(shape: Sequence[int], settings: AgentSettings, field: str) -> None:
    if not shape:
        return  # the model's default shape
    if any(d <= 0 for d in shape):
        raise InvalidSpec(f"{field}: expected positive sizes, actual {list(shape)}")
    elements = math.prod(shape)
    if elements > settings.max_input_elements:
        raise InvalidSpec(
            f"{field}: expected at most {settings.max_input_elements} elements, "
            f"actual {list(shape)} ({elements} elements)"
        )
