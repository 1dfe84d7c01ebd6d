"""status.profile: a profile survives the round trip through a deployment's status, and what does
not match the key, does not parse or does not check out is ignored (profiled again)."""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import replace
from typing import Any

import pytest

from amp4ec.operator import profilestatus
from amp4ec.operator.profiles import ModelCosts, ProfileKey
from amp4ec.planner import CodecProfile, LayerProfile, TileRows

KEY = ProfileKey("mobilenet_v2", 0, (1, 3, 64, 64), "ml", "", "")
TILE = TileRows(8, 4, (0, 1, 3, 5), (3, 5, 7, 8), codec_ns_per_byte=0.4, fixed=0.3, overhead=0.1)
COSTS = ModelCosts(
    blocks=(
        LayerProfile("features.0", 10**6, 1000, 4096, 1.5, 8192, tile=TILE, batch_ms=((2, 2.5), (4, 4.0))),
        LayerProfile("classifier", 10**4, 400, 40, 0.1, 4096),
    ),
    input_bytes=3 * 64 * 64 * 4,
    reference_ms=12.5,
    codecs=(CodecProfile("fp16", (1, 2, 3), (0.0, 0.1, 0.1), (0.0, 0.1, 0.1), (0.0, 1e-4, 1e-4)),),
)


def _data(document: Any) -> str:
    return base64.b64encode(zlib.compress(json.dumps(document).encode())).decode()


def test_a_profile_round_trips_through_the_status() -> None:
    stored = profilestatus.encode(KEY, COSTS)
    assert stored is not None and stored["key"] == KEY.digest()
    assert json.loads(json.dumps(stored)) == stored  # plain JSON for the API server
    assert profilestatus.decode(stored, KEY) == COSTS


def test_a_profile_of_another_key_is_not_used() -> None:
    stored = profilestatus.encode(KEY, COSTS)
    assert profilestatus.decode(stored, replace(KEY, seed=1)) is None
    assert profilestatus.decode(stored, replace(KEY, namespace="other")) is None


def _document() -> dict[str, Any]:
    raw = profilestatus.encode(KEY, COSTS)
    assert raw is not None
    return json.loads(zlib.decompress(base64.b64decode(raw["data"])))


@pytest.mark.parametrize(
    "stored",
    [
        None,
        "a string",
        {"key": KEY.digest()},
        {"key": KEY.digest(), "data": "not base64 !"},
        {"key": KEY.digest(), "data": base64.b64encode(b"not zlib").decode()},
        {"key": KEY.digest(), "data": _data(["not", "a", "profile"])},
        {"key": KEY.digest(), "data": _data({**_document(), "blocks": []})},
        {"key": KEY.digest(), "data": _data({**_document(), "inputBytes": -1})},
        {
            "key": KEY.digest(),
            "data": _data({**_document(), "blocks": [{**_document()["blocks"][1], "compute_ms": -1.0}]}),
        },
        {
            "key": KEY.digest(),
            "data": _data({**_document(), "blocks": [{**_document()["blocks"][1], "unknown": 1}]}),
        },
        {
            "key": KEY.digest(),
            "data": _data({**_document(), "blocks": [{**_document()["blocks"][0], "tile": {"lo": "x"}}]}),
        },
    ],
    ids=[
        "none", "string", "no data", "not base64", "not zlib", "not a profile", "no blocks",
        "negative input", "negative time", "unknown field", "bad tile",
    ],
)  # fmt: skip
def test_what_does_not_check_out_is_ignored(stored: Any) -> None:
    assert profilestatus.decode(stored, KEY) is None


def test_a_stored_profile_cannot_inflate_beyond_its_bound() -> None:
    bomb = base64.b64encode(zlib.compress(b" " * (64 * 1024 * 1024), 9)).decode()
    assert len(bomb) <= profilestatus.MAX_STORED_BYTES
    assert profilestatus.decode({"key": KEY.digest(), "data": bomb}, KEY) is None


def test_a_profile_too_big_for_the_status_is_not_stored() -> None:
    many = tuple(
        LayerProfile(f"b{i}", i, i, i, 1.0 + i / 7, i, tile=replace(TILE, fixed=(i % 97) / 97))
        for i in range(20000)
    )
    assert profilestatus.encode(KEY, replace(COSTS, blocks=many, codecs=())) is None
