"""Activation codec names ⇄ the wire enum (``Codec`` in shard.proto), torch-free: stage specs,
flags and plans name codecs; ``codec.py`` does the encoding."""

from __future__ import annotations

from amp4ec.errors import InvalidSpec
from amp4ec.wire.v1 import shard_pb2

__all__ = ["CODECS", "codec_name", "codec_value"]

CODECS: dict[str, int] = {
    "raw": shard_pb2.CODEC_RAW,
    "fp16": shard_pb2.CODEC_FP16,
    "int8": shard_pb2.CODEC_INT8,
}
"""Codec names (as plans, flags and specs spell them) → the wire enum."""
_NAMES = {v: k for k, v in CODECS.items()}


def codec_value(name: str, field: str = "codec") -> int:
    """The wire enum of a codec name, or InvalidSpec naming ``field``."""
    try:
        return CODECS[name]
    except KeyError:
        raise InvalidSpec(f"{field}: expected one of {', '.join(CODECS)}, got {name!r}") from None


def codec_name(value: int, field: str = "codec") -> str:
    """The name of a wire codec enum value, or InvalidSpec naming ``field``."""
    try:
        return _NAMES[value]
    except KeyError:
        raise InvalidSpec(f"{field}: expected one of {', '.join(CODECS)}, got {value}") from None
