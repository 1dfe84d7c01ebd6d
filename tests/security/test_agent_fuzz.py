"""Property-based fuzzing of a real agent process: random frames, control messages and raw bytes
never crash it, every answer carries a deliberate status (never UNKNOWN or INTERNAL), and its
RSS stays within the stated bound. Example counts are bounded so the module runs in ~30 s."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amp4ec.wire import codec
from amp4ec.wire.v1 import agent_pb2, agent_pb2_grpc, shard_pb2, shard_pb2_grpc
from tests.security.agent import AgentProcess
from tests.security.test_agent_abuse import FLAGS, FRAME, MiB, _connection, _valid, rss_slack

# Deliberate answers; UNKNOWN or INTERNAL would mean an unhandled case in the agent.
EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
)

dims = st.one_of(st.integers(-3, 300), st.sampled_from([0, 1, 3, 128, 1 << 31, 1 << 62, (1 << 63) - 1]))
tensors = st.builds(
    shard_pb2.Tensor,
    dtype=st.one_of(st.sampled_from([*codec.DTYPES, "float8", ""]), st.text(max_size=8)),
    shape=st.lists(dims, max_size=6),
    data=st.binary(max_size=256),
)
frames = st.builds(
    shard_pb2.Frame,
    request_id=st.text(max_size=300),
    tensors=st.one_of(st.lists(tensors, max_size=3), st.just(list(FRAME.tensors))),
    deadline_unix_ms=st.one_of(st.just(0), st.integers(0, 1 << 62)),
)
models = st.one_of(
    st.sampled_from(
        ["os:abort", "sys:exit", "builtins:exit", "tests.model_zoo:residual_net", "x.pt2", ":", ""]
    ),
    st.text(max_size=40),
)
specs = st.builds(
    agent_pb2.StageSpec,
    model=models,
    weights=st.one_of(st.just(""), st.text(max_size=20)),
    input_shape=st.lists(st.one_of(st.integers(-2, 50_000), st.just(1 << 40)), max_size=5),
    first_block=st.integers(-5, 10),
    last_block=st.integers(-5, 10),
    next_hop=st.text(max_size=30),
)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    process = AgentProcess(tmp_path_factory.mktemp("fuzz"), *FLAGS)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def channel(agent: AgentProcess) -> Iterator[grpc.Channel]:
    with _connection(agent) as ch:
        yield ch


@pytest.fixture(scope="module")
def warm_rss(agent: AgentProcess, channel: grpc.Channel) -> int:
    for _ in range(20):
        _valid(channel)
    return agent.rss_bytes()


def _status(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_fuzzed_frames(agent: AgentProcess, channel: grpc.Channel, warm_rss: int) -> None:
    stub = shard_pb2_grpc.ShardStub(channel)

    @FUZZ
    @given(batch=st.lists(frames, min_size=1, max_size=4))
    def check(batch: list[shard_pb2.Frame]) -> None:
        for frame in batch:
            assert _status(lambda frame=frame: stub.Infer(frame, timeout=30)) in EXPECTED
        answers = list(stub.Stream(iter(batch), timeout=30))
        assert len(answers) == len(batch)
        for answer in answers:
            assert not answer.error.code or grpc.StatusCode[answer.error.code] in EXPECTED, answer.error

    check()
    _after(agent, channel, warm_rss)


def test_fuzzed_control_messages(agent: AgentProcess, channel: grpc.Channel, warm_rss: int) -> None:
    control = agent_pb2_grpc.NodeAgentStub(channel)
    monitor = agent_pb2_grpc.MonitorStub(channel)

    @FUZZ
    @given(spec=specs, repeats=st.integers(-(1 << 31), (1 << 31) - 1), reply=st.integers(-(1 << 63), 1 << 30))
    def check(spec: agent_pb2.StageSpec, repeats: int, reply: int) -> None:
        # Never a model this agent may load, so the served stage stays: every call is refused.
        assert _status(lambda: control.LoadStage(spec, timeout=30)) == grpc.StatusCode.INVALID_ARGUMENT
        profile = agent_pb2.ProfileRequest(model=spec, repeats=repeats)
        # Out of bounds: INVALID_ARGUMENT; within them: a monitor profiles no model at all.
        assert _status(lambda: monitor.Profile(profile, timeout=30)) in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.PERMISSION_DENIED,
        )
        echo = _status(lambda: control.Echo(agent_pb2.Probe(reply_bytes=reply), timeout=30))
        assert echo == (grpc.StatusCode.OK if 0 <= reply <= 4 * MiB else grpc.StatusCode.INVALID_ARGUMENT)

    check()
    _after(agent, channel, warm_rss)


def test_fuzzed_raw_bytes(agent: AgentProcess, channel: grpc.Channel, warm_rss: int) -> None:
    methods = {
        name: channel.unary_unary(name, request_serializer=None, response_deserializer=None)
        for name in (
            "/amp4ec.wire.v1.Shard/Infer",
            "/amp4ec.wire.v1.NodeAgent/LoadStage",
            "/amp4ec.wire.v1.NodeAgent/Echo",
            "/amp4ec.wire.v1.Monitor/Profile",
        )
    }
    stream = channel.stream_stream(
        "/amp4ec.wire.v1.Shard/Stream", request_serializer=None, response_deserializer=None
    )

    @FUZZ
    @given(raw=st.lists(st.binary(max_size=512), min_size=1, max_size=4))
    def check(raw: list[bytes]) -> None:
        for name, method in methods.items():
            # A decodable Profile within the bounds: a monitor profiles no model (PERMISSION_DENIED).
            expected = EXPECTED | (
                {grpc.StatusCode.PERMISSION_DENIED} if name.endswith("/Profile") else set()
            )
            for data in raw:
                assert _status(lambda method=method, data=data: method(data, timeout=30)) in expected
        answers = [shard_pb2.Frame.FromString(b) for b in stream(iter(raw), timeout=30)]
        assert len(answers) == len(raw)
        assert all(not a.error.code or grpc.StatusCode[a.error.code] in EXPECTED for a in answers)

    check()
    _after(agent, channel, warm_rss)


def _after(agent: AgentProcess, channel: grpc.Channel, warm_rss: int) -> None:
    assert agent.alive(), agent.log_tail()
    assert _valid(channel) < 2.0
    grown = agent.rss_bytes() - warm_rss
    print(f"RSS +{grown / MiB:.0f} MiB over warm after fuzzing")
    assert grown <= rss_slack(1), f"RSS grew {grown / MiB:.0f} MiB"
