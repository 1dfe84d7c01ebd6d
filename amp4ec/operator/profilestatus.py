"""A deployment's model profile kept in its own status, so a restarted operator plans at once.

Why: the profile cache lives in the operator's memory. After a restart (a power cut at the edge
takes the operator's node down with others) every deployment would wait for a new profiler Pod
before it could re-plan around a node that did not come back. ``status.profile`` holds the
profile the deployment was last planned from: ``{key, data}``, the profile key's digest and
the profile as zlib-compressed JSON in base64 (a ResNet-50 profile is a few KiB).

Read back, it is checked like any planner input, since a status is written by whoever may patch
it: the digest must match the deployment's current profile key, the data must decompress within
a bound and parse into profiles the planner accepts. Anything else is ignored, and the model is
profiled again, as without a stored profile.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import zlib
from dataclasses import asdict
from typing import Any

from amp4ec.errors import InvalidSpec
from amp4ec.operator.profiles import ModelCosts, ProfileKey
from amp4ec.planner.types import CodecProfile, LayerProfile, TileRows
from amp4ec.planner.validate import check_blocks, check_codecs

__all__ = ["MAX_STORED_BYTES", "decode", "encode"]

log = logging.getLogger(__name__)

MAX_STORED_BYTES = 256 * 1024
"""The most ``status.profile.data`` may take (base64): a bigger profile is not stored (the
resource stays small; a restarted operator profiles that model again)."""
_MAX_JSON_BYTES = 16 * 1024 * 1024
"""The most the data may decompress to: a hostile status cannot make the operator inflate more."""


def encode(key: ProfileKey, costs: ModelCosts) -> dict[str, str] | None:
    """``status.profile`` for ``costs`` under ``key`` (None: too big to store)."""
    document = {
        "blocks": [asdict(b) for b in costs.blocks],
        "inputBytes": costs.input_bytes,
        "referenceMs": costs.reference_ms,
        "codecs": [asdict(c) for c in costs.codecs],
    }
    raw = json.dumps(document, separators=(",", ":")).encode()
    data = base64.b64encode(zlib.compress(raw, 9)).decode()
    if len(data) > MAX_STORED_BYTES:
        what = key.model or key.storage_uri
        log.info("profile of %s not stored in status: %d bytes encoded", what, len(data))
        return None
    return {"key": key.digest(), "data": data}


def decode(stored: Any, key: ProfileKey) -> ModelCosts | None:
    """The profile ``stored`` holds when it was stored under ``key`` and is valid, else None."""
    if not isinstance(stored, dict) or stored.get("key") != key.digest():
        return None
    data = stored.get("data")
    if not isinstance(data, str) or len(data) > MAX_STORED_BYTES:
        return None
    try:
        inflate = zlib.decompressobj()
        raw = inflate.decompress(base64.b64decode(data, validate=True), _MAX_JSON_BYTES)
        if inflate.unconsumed_tail:
            raise ValueError(f"inflates beyond {_MAX_JSON_BYTES} bytes")
        document = json.loads(raw)
        blocks = check_blocks(_layer(b) for b in document["blocks"])
        codecs = check_codecs((_codec(c) for c in document["codecs"]), len(blocks))
        costs = ModelCosts(blocks, _count(document["inputBytes"]), _number(document["referenceMs"]), codecs)
    except (binascii.Error, zlib.error, ValueError, TypeError, KeyError, AttributeError, InvalidSpec) as exc:
        log.warning("status.profile ignored (profiling again): %s", exc)
        return None
    return costs


def _layer(d: dict[str, Any]) -> LayerProfile:
    fields = dict(d)
    tile = fields.pop("tile")
    batch_ms = tuple((b, ms) for b, ms in fields.pop("batch_ms"))
    if tile is not None:
        tile = TileRows(**{**tile, "lo": tuple(tile["lo"]), "hi": tuple(tile["hi"])})
    return LayerProfile(**fields, tile=tile, batch_ms=batch_ms)


def _codec(d: dict[str, Any]) -> CodecProfile:
    return CodecProfile(**{k: v if k == "name" else tuple(v) for k, v in d.items()})


def _count(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"expected a count, got {v!r}")
    return v


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
        raise ValueError(f"expected a positive number, got {v!r}")
    return float(v)
