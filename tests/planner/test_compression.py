"""Compression in the cost model: a cut is compressed exactly when the wire time it saves
exceeds the codec's CPU (the choice flips at the break-even bandwidth), within the error
bound, and the exact search stays exact with codecs (brute force)."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amp4ec.errors import InvalidSpec
from amp4ec.planner import CodecProfile, LayerProfile, Link, NodeCapacity, evaluate, plan
from amp4ec.planner.cost import CostModel
from amp4ec.planner.dp import Search
from tests.planner.planner_cases import MB, TIE, all_pipelines, brute_rate, brute_single, close, instances


def _codec(name: str, blocks: int, raw: list[int], ratio: float, enc: float, dec: float, err: float):
    cuts = blocks + 1
    return CodecProfile(
        name=name,
        wire_bytes=tuple(int(b * ratio) for b in raw),
        encode_ms=(enc,) * cuts,
        decode_ms=(dec,) * cuts,
        error=(err,) * cuts,
    )


def _two_nodes(raw_cut: int, s0: float, s1: float) -> tuple[list[LayerProfile], list[NodeCapacity]]:
    """Two blocks that fit one per node, so every plan cuts between them (cut 1 crosses n0→n1
    or n1→n0, links symmetric)."""
    blocks = [
        LayerProfile("a", 0, 60 * MB, raw_cut, 10.0, 0),
        LayerProfile("b", 0, 60 * MB, 4000, 10.0, 0),
    ]
    nodes = [
        NodeCapacity("n0", 1.0, 100 * MB, speed=s0),
        NodeCapacity("n1", 1.0, 100 * MB, speed=s1),
    ]
    return blocks, nodes


@settings(max_examples=80, deadline=None)
@given(
    raw=st.integers(10_000, 20 * MB),
    ratio=st.sampled_from([0.25, 0.5]),
    enc=st.floats(0.01, 20.0),
    dec=st.floats(0.01, 20.0),
    s0=st.sampled_from([0.3, 0.7, 1.0]),
    s1=st.sampled_from([0.3, 0.7, 1.0]),
    side=st.sampled_from([0.9, 1.1]),
)
def test_compression_flips_at_the_break_even_bandwidth(raw, ratio, enc, dec, s0, s1, side) -> None:
    blocks, nodes = _two_nodes(raw, s0, s1)
    sizes = [0, raw, 4000]
    fp16 = _codec("int8" if ratio == 0.25 else "fp16", 2, sizes, ratio, enc, dec, 1e-4)
    # Break-even: raw / bw = wire / bw + encode / s_sender + decode / s_receiver (ms, bytes/s).
    saved = raw - fp16.wire_bytes[1]
    for sender, receiver in (("n0", "n1"), ("n1", "n0")):
        speed = {"n0": s0, "n1": s1}
        cpu = enc / speed[sender] + dec / speed[receiver]
        even = 1000.0 * saved / cpu
        bw = even * side
        links = [Link("n0", "n1", 1.0, bw)]
        cm = CostModel(blocks, nodes, links, codecs=[fp16])
        cut = cm.cut(sender, receiver, 1)
        assert cut.codec == (fp16.name if side < 1 else "raw")
        assert math.isclose(cut.total_ms, min(1000 * raw / bw, 1000 * fp16.wire_bytes[1] / bw + cpu) + 0.5)
    # The whole planner follows: the first stage sends in the codec only below break-even.
    cpu_both = max(enc / s0 + dec / s1, enc / s1 + dec / s0)
    cpu_low = min(enc / s0 + dec / s1, enc / s1 + dec / s0)
    # Below: compression pays whichever way round; above: raw wins whichever way round.
    bw = 1000.0 * saved / (cpu_both if side < 1 else cpu_low) * side
    got = plan(blocks, nodes, links=[Link("n0", "n1", 1.0, bw)], codecs=[fp16])
    assert len(got.stages) == 2
    assert got.stages[0].out_codec == (fp16.name if side < 1 else "raw")
    assert got.stages[1].out_codec == "raw"  # the answer: no codec saves bytes on it
    assert (got.stages[1].codec_ms > 0) == (side < 1)
    assert got.predicted.output_error == (1e-4 if side < 1 else 0.0)
    assert evaluate(got, blocks, nodes, [Link("n0", "n1", 1.0, bw)], codecs=[fp16]) == got.predicted


def _three_node_split(err_int8: float) -> dict:
    """Three blocks, one per node, slow links everywhere: every inner cut wants int8."""
    blocks = [LayerProfile(f"b{i}", 0, 60 * MB, 2 * MB, 20.0, 0) for i in range(3)]
    nodes = [NodeCapacity(f"n{i}", 1.0, 100 * MB) for i in range(3)]
    links = [Link(a, b, 1.0, 2.5e6) for a, b in (("n0", "n1"), ("n1", "n2"), ("n0", "n2"))]
    sizes = [0, 2 * MB, 2 * MB, 2 * MB]
    codecs = [
        _codec("fp16", 3, sizes, 0.5, 0.5, 0.5, 2e-4),
        _codec("int8", 3, sizes, 0.25, 1.0, 1.0, err_int8),
    ]
    return {"blocks": blocks, "nodes": nodes, "links": links, "codecs": codecs}


def test_error_bound_chooses_the_codec_and_sums_over_cuts() -> None:
    case = _three_node_split(err_int8=6e-3)

    def codecs(p) -> list[str]:
        return [s.out_codec for s in p.stages[:-1]]

    assert codecs(plan(**case)) == ["int8", "int8"]  # no bound: the cheapest
    assert codecs(plan(**case, max_error=1e-3)) == ["fp16", "fp16"]  # int8 alone is over it
    assert codecs(plan(**case, max_error=0.0)) == ["raw", "raw"]  # lossless only
    # Each int8 cut is within 1e-2, two of them are not: the planner halves the per-cut limit.
    bounded = plan(**case, max_error=1e-2)
    assert bounded.predicted.output_error <= 1e-2
    assert codecs(bounded) == ["fp16", "fp16"]
    assert any("output error within 0.01" in n for n in bounded.notes)
    roomy = plan(**case, max_error=1.3e-2)
    assert codecs(roomy) == ["int8", "int8"] and math.isclose(roomy.predicted.output_error, 1.2e-2)


def test_without_codecs_the_plan_is_unchanged() -> None:
    case = _three_node_split(err_int8=1e-3)
    bare = plan(case["blocks"], case["nodes"], links=case["links"])
    off = plan(case["blocks"], case["nodes"], links=case["links"], codecs=[], max_error=0.5)
    assert bare == off and all(s.out_codec == "raw" and s.codec_ms == 0 for s in bare.stages)


def test_codec_profiles_are_validated_naming_the_field() -> None:
    case = _three_node_split(err_int8=1e-3)
    good = case["codecs"][0]
    bad = {
        r"codecs\[0\]\.name: expected one of fp16, int8, each once, got 'zip'": [
            CodecProfile("zip", good.wire_bytes, good.encode_ms, good.decode_ms, good.error)
        ],
        r"codecs\[1\]\.name: .*got 'fp16'": [good, good],
        r"codecs\[0\]\.error: expected 4 entries": [
            CodecProfile("fp16", good.wire_bytes, good.encode_ms, good.decode_ms, (0.0,))
        ],
        r"codecs\[0\]\.error\[2\]: expected a finite number, got nan": [
            CodecProfile("fp16", good.wire_bytes, good.encode_ms, good.decode_ms, (0.0, 0.0, math.nan, 0.0))
        ],
        r"codecs\[0\]\.wire_bytes\[1\]: expected an integer ≥ 0, got -5": [
            CodecProfile("fp16", (0, -5, 0, 0), good.encode_ms, good.decode_ms, good.error)
        ],
    }
    for pattern, codecs in bad.items():
        with pytest.raises(InvalidSpec, match=pattern):
            plan(case["blocks"], case["nodes"], links=case["links"], codecs=codecs)
    with pytest.raises(InvalidSpec, match=r"max_error: expected a number ≥ 0, got -1"):
        plan(case["blocks"], case["nodes"], links=case["links"], codecs=case["codecs"], max_error=-1)


@st.composite
def _with_codecs(draw) -> dict:
    instance = draw(instances(max_blocks=5, max_nodes=3))
    blocks = instance["blocks"]
    sizes = [instance["input_bytes"], *(b.out_bytes for b in blocks)]
    codecs = []
    for name, ratio in (("fp16", 0.5), ("int8", 0.25)):
        if draw(st.booleans()):
            codecs.append(
                CodecProfile(
                    name,
                    tuple(int(b * ratio) for b in sizes),
                    tuple(draw(st.floats(0.0, 5.0)) for _ in sizes),
                    tuple(draw(st.floats(0.0, 5.0)) for _ in sizes),
                    tuple(draw(st.floats(0.0, 0.02)) for _ in sizes),
                )
            )
    if draw(st.booleans()):  # uniform slow links: nodes differ only in speed, which codecs see
        instance = {**instance, "links": [], "default_link": Link("client", "client", 1.0, 2e6)}
    return {**instance, "codecs": codecs}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_with_codecs(), st.sampled_from(["throughput", "latency"]))
def test_exact_search_with_codecs_matches_brute_force(instance, objective) -> None:
    cm = CostModel(
        instance["blocks"],
        instance["nodes"],
        instance["links"],
        input_bytes=instance["input_bytes"],
        codecs=instance["codecs"],
        default_link=instance.get("default_link"),
    )
    if not any(True for _ in all_pipelines(cm)):
        return
    got = plan(**instance, objective=objective)
    if objective == "throughput":
        assert got.predicted.throughput_rps >= brute_rate(cm) * (1 - 1e-6) - 1e-9
    else:
        best = brute_single(cm, "latency")
        assert best is not None and close(got.predicted.latency_ms, best[0])
        assert got.predicted.bottleneck_ms <= best[1] + TIE + 1e-6
    again = cm.price(cm.to_raw(got))[1]
    assert again == got.predicted


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_with_codecs())
def test_link_classes_share_exactly_the_inbound_costs(instance) -> None:
    """The exact DP prices a stage's inbound cut by one representative of the previous node's
    class; with codecs that is exact only if the class members' costs agree (speeds included)."""
    cm = CostModel(
        instance["blocks"],
        instance["nodes"],
        instance["links"],
        input_bytes=instance["input_bytes"],
        codecs=instance["codecs"],
        default_link=instance.get("default_link"),
    )
    sp = Search(cm, list(range(cm.N)))
    for ln in range(cm.N):
        for p in range(cm.N):
            if p != ln and sp.tin[sp.cls[p]][ln]:
                assert sp.tin[sp.cls[p]][ln] == cm.xfer_ns(cm.names[p], cm.names[ln])


def test_a_slow_sender_is_its_own_link_class_with_codecs() -> None:
    """Uniform links, but n0 encodes 3x slower: its stage-to-n2 cut costs more than n1's."""
    blocks = [LayerProfile("a", 0, 1, 2 * MB, 1.0, 0), LayerProfile("b", 0, 1, 2 * MB, 1.0, 0)]
    nodes = [
        NodeCapacity("n0", 1.0, 100 * MB, speed=0.3),
        NodeCapacity("n1", 1.0, 100 * MB, speed=1.0),
        NodeCapacity("n2", 1.0, 100 * MB, speed=1.0),
    ]
    fp16 = CodecProfile("fp16", (0, MB, MB), (5.0,) * 3, (0.1,) * 3, (0.0,) * 3)
    slow = Link("client", "client", 1.0, 2e6)
    cm = CostModel(blocks, nodes, [], codecs=[fp16], default_link=slow)
    sp = Search(cm, [0, 1, 2])
    assert sp.cls[0] != sp.cls[1] == sp.cls[2]
    assert cm.xfer_ns("n0", "n2") != cm.xfer_ns("n1", "n2")
    bare = Search(CostModel(blocks, nodes, [], default_link=slow), [0, 1, 2])
    assert bare.cls == [0, 0, 0]  # without codecs speed does not matter to a transfer
