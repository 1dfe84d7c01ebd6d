"""Codec measurements per cut (for the planner) and the output error of a deployment."""

from __future__ import annotations

import math

import torch

from amp4ec.node_agent.profiler import profile_model
from amp4ec.planner import plan
from amp4ec.planner.types import CodecProfile, NodeCapacity
from amp4ec.slicing import ModelSource, load_model, profile_chain, split_model
from amp4ec.slicing.compression import fixed_inputs, output_error, profile_codecs, relative_l2
from amp4ec.wire.v1 import agent_pb2

MODEL = "tests.model_zoo:residual_net"


def test_every_cut_measured_and_plannable() -> None:
    loaded = load_model(ModelSource(MODEL))
    chain = split_model(loaded)
    codecs = profile_codecs(chain, loaded.example_inputs, repeats=1)
    assert [c.name for c in codecs] == ["fp16", "int8"]
    cuts = len(chain) + 1
    fp16, int8 = codecs
    raw0 = chain.input_bytes
    for c in codecs:
        assert all(len(getattr(c, f)) == cuts for f in ("wire_bytes", "encode_ms", "decode_ms", "error"))
        assert (c.wire_bytes[0], c.encode_ms[0], c.error[0]) == (raw0, 0.0, 0.0)  # the client sends raw
    # Inside the body a cut carries the activation and the skip: fp16 halves them, int8 about quarters.
    blocks = profile_chain(chain, loaded.example_inputs, repeats=1, warmup=0)
    raw = blocks[1].out_bytes
    assert fp16.wire_bytes[2] == raw // 2 and int8.wire_bytes[2] < raw * 0.3
    assert 0 < fp16.error[2] < 1e-3 and 0 < int8.error[2] < 2e-2
    # The planner accepts them as measured.
    nodes = [NodeCapacity("a", 1.0, 2**30)]
    assert plan(blocks, nodes, codecs=codecs, input_bytes=raw0).predicted.output_error == 0.0


def test_monitor_profiles_codecs_only_when_asked() -> None:
    spec = agent_pb2.StageSpec(model=MODEL)
    bare = profile_model(agent_pb2.ProfileRequest(model=spec, repeats=1))
    full = profile_model(agent_pb2.ProfileRequest(model=spec, repeats=1, codecs=True))
    assert not bare.codecs and [c.name for c in full.codecs] == ["fp16", "int8"]
    c = full.codecs[1]
    assert len(c.wire_bytes) == len(c.error) == len(full.blocks) + 1
    CodecProfile(c.name, tuple(c.wire_bytes), tuple(c.encode_ms), tuple(c.decode_ms), tuple(c.error))


def test_output_error_and_top1_agreement() -> None:
    ref = [(torch.tensor([[1.0, 2.0, 3.0]]),), (torch.tensor([[3.0, 2.0, 1.0]]),)]
    same = output_error(ref, ref)
    assert (same.rel_l2_max, same.top1_agreement, same.inputs) == (0.0, 1.0, 2)
    flipped = [(torch.tensor([[1.0, 2.0, 3.0]]),), (torch.tensor([[1.0, 2.0, 3.0]]),)]
    off = output_error(flipped, ref)
    assert off.top1_agreement == 0.5
    assert math.isclose(off.rel_l2_max, math.sqrt(8 / 14))
    assert math.isclose(off.rel_l2_mean, math.sqrt(8 / 14) / 2)
    assert relative_l2((torch.zeros(2),), (torch.zeros(2),)) == 0.0
    sets = fixed_inputs((torch.zeros(1, 3), torch.tensor([7])), 3)
    assert len(sets) == 3 and torch.equal(sets[0][0], torch.zeros(1, 3))
    assert torch.equal(sets[1][1], torch.tensor([7])) and not torch.equal(sets[1][0], sets[2][0])
    again = fixed_inputs((torch.zeros(1, 3), torch.tensor([7])), 3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(sets, again, strict=True))
