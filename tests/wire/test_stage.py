"""The one stage spec: protobuf and command-line forms say the same thing."""

from __future__ import annotations

import pytest

from amp4ec.node_agent.cli import parse_args
from amp4ec.slicing import ModelSource
from amp4ec.wire.stage import StageConfig, TilePeer, TilePhase

FULL = StageConfig(
    model="resnet18",
    first_block=2,
    last_block=5,
    next_hop="stage-2.ns.svc:50051",
    stage=1,
    weights="/models/w.pt",
    seed=7,
    input_shape=(1, 3, 32, 32),
    next_node="edge-b",
    next_hop_identity="stage-2.d.ns.amp4ec",
    accept_from=("stage-0.d.ns.amp4ec", "client.d.ns.amp4ec"),
    output_codec="int8",
    max_batch_requests=4,
    max_queue_delay_ms=2.5,
)

TILED = StageConfig(
    model="mobilenet_v2",
    last_block=-1,
    accept_from=("client.d.ns.amp4ec",),
    tile_phases=(
        TilePhase(
            0,
            4,
            (
                TilePeer("edge-a", "", "stage-0.d.ns.amp4ec", (0, 12)),
                TilePeer("edge-b", "d-1234abcd-p0s0-t1.ns.svc:50051", "stage-0.d.ns.amp4ec", (12, 24)),
            ),
        ),
        TilePhase(6, 6, (TilePeer("edge-a", "", "", (0, 3)), TilePeer("edge-b", "[::1]:9", "", (3, 6)))),
    ),
)
TILE_ONLY = StageConfig(
    model="mobilenet_v2",
    last_block=6,
    tile_only=True,
    tile_phases=(TilePhase(0, 4, (TilePeer("edge-b", "", "", (12, 24)),)),),
)


@pytest.mark.parametrize(
    "config",
    [FULL, StageConfig("mobilenet_v2"), TILED, TILE_ONLY],
    ids=["every field", "defaults", "tiled", "tile stage"],
)
def test_message_and_flags_round_trip(config: StageConfig) -> None:
    assert StageConfig.from_message(config.to_message()) == config
    _, parsed, _, _ = parse_args(["--insecure", *config.to_args()])
    assert parsed == config


def test_a_model_source_names_its_stage() -> None:
    source = ModelSource("resnet18", weights="/models/w.pt", seed=7, input_shape=(1, 3, 32, 32))
    stage = source.stage(
        2,
        5,
        next_hop=FULL.next_hop,
        stage=1,
        next_node="edge-b",
        next_hop_identity=FULL.next_hop_identity,
        accept_from=FULL.accept_from,
        output_codec="int8",
        max_batch_requests=4,
        max_queue_delay_ms=2.5,
    )
    assert stage == FULL


def test_an_unknown_codec_is_refused_naming_the_field() -> None:
    from amp4ec.errors import InvalidSpec

    message = FULL.to_message()
    message.output_codec = 5
    with pytest.raises(InvalidSpec, match=r"output_codec: expected one of raw, fp16, int8, got 5"):
        StageConfig.from_message(message)


@pytest.mark.parametrize(
    "value",
    [
        "{",
        '{"first": 0, "last": 1, "tiles": []}',
        '{"first": 0, "last": 1, "tiles": [{"node": "a", "rows": [1]}]}',
    ],
)
def test_a_malformed_tile_phase_flag_is_refused_naming_it(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--insecure", "--model", "mobilenet_v2", "--tile-phase", value])
    assert "--tile-phase: expected" in capsys.readouterr().err
