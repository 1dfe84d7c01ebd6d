"""Split models run block by block give exactly what the whole model gives."""

from __future__ import annotations

import gc
import itertools
import random
import weakref
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from amp4ec.errors import InvalidSpec, ShapeMismatch
from amp4ec.models import ZOO
from amp4ec.slicing import BlockChain, LoadedModel, ModelSource, Shard, TensorSpec, load_model, split_model
from tests.model_zoo import residual_net

RESIDUAL = "tests.model_zoo:residual_net"
# Small inputs keep the suite fast; the chains are the same at 224x224. vit_tiny's position
# embedding fixes its input size. vit_b_16 is vit_tiny's code path at 30x the cost: left out.
ZOO_CASES = {name: None if name.startswith("vit") else (1, 3, 64, 64) for name in ZOO if name != "vit_b_16"}


@dataclass
class Case:
    loaded: LoadedModel
    chain: BlockChain
    expected: tuple[torch.Tensor, ...]


def _case(source: ModelSource) -> Case:
    loaded = load_model(source)
    chain = split_model(loaded)
    with torch.inference_mode():
        out = loaded.module(*loaded.example_inputs)
    return Case(loaded, chain, out if isinstance(out, tuple) else (out,))


def _run(shards: list[Shard], inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode():
        for shard in shards:
            shard.check_inputs(inputs)
            inputs = shard(*inputs)
    return inputs


def _assert_same(actual: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module", params=sorted(ZOO_CASES))
def zoo(request: pytest.FixtureRequest) -> Case:
    return _case(ModelSource(request.param, input_shape=ZOO_CASES[request.param]))


@pytest.fixture(scope="module")
def residual() -> Case:
    return _case(ModelSource(RESIDUAL))


@pytest.fixture(scope="module")
def residual_pt2(tmp_path_factory: pytest.TempPathFactory, residual: Case) -> Case:
    path = tmp_path_factory.mktemp("pt2") / "residual.pt2"
    program = torch.export.export(residual.loaded.module, residual.loaded.example_inputs)
    torch.export.save(program, path)
    return _case(ModelSource(str(path)))


def test_every_block_alone_chained_equals_monolith(zoo: Case) -> None:
    chain = zoo.chain
    shards = [chain.shard(i, i) for i in range(len(chain))]
    _assert_same(_run(shards, zoo.loaded.example_inputs), zoo.expected)


@pytest.mark.parametrize("parts", [2, 3])
def test_random_contiguous_shards_equal_monolith(zoo: Case, parts: int) -> None:
    n = len(zoo.chain)
    rng = random.Random(f"{zoo.loaded.name}/{parts}")
    for _ in range(2):
        cuts = [0, *sorted(rng.sample(range(1, n), parts - 1)), n]
        shards = [zoo.chain.shard(a, b - 1) for a, b in itertools.pairwise(cuts)]
        _assert_same(_run(shards, zoo.loaded.example_inputs), zoo.expected)


def test_zoo_block_names() -> None:
    names = {n: split_model(load_model(ModelSource(n, input_shape=s))).names for n, s in ZOO_CASES.items()}
    assert names["mobilenet_v2"] == [f"features.{i}" for i in range(19)] + ["classifier.0", "classifier.1"]
    assert names["resnet18"] == [
        "conv1", "bn1", "relu", "maxpool",
        *(f"layer{i}.{j}" for i in range(1, 5) for j in range(2)),
        "avgpool", "fc",
    ]  # fmt: skip
    layers = [f"encoder.layers.encoder_layer_{i}" for i in range(6)]
    assert names["vit_tiny"] == ["conv_proj", "encoder.dropout", *layers, "encoder.ln", "heads.head"]


def test_mobilenet_residual_blocks_are_never_cut() -> None:
    # Each InvertedResidual keeps its skip inside one block: every cut carries one tensor.
    chain = split_model(load_model(ModelSource("mobilenet_v2", input_shape=(1, 3, 32, 32))))
    assert all(len(b) == 1 for b in chain.boundaries)
    assert chain.boundaries[4] == (TensorSpec((1, 24, 8, 8), torch.float32),)  # after features.3


def test_residual_cuts_carry_the_skip_tensor(residual: Case) -> None:
    chain = residual.chain
    assert chain.names == ["stem", "body.0", "body.1", "body.2", "head"]
    widths = [len(b) for b in chain.boundaries]
    assert widths == [1, 1, 2, 2, 1, 1]  # body.0 and body.1 forward the stem's output
    assert chain.boundaries[2][0] == chain.boundaries[2][1]
    for k in range(len(chain) - 1):
        shards = [chain.shard(0, k), chain.shard(k + 1, len(chain) - 1)]
        _assert_same(_run(shards, residual.loaded.example_inputs), residual.expected)


def test_exported_archive_splits_like_the_factory(residual: Case, residual_pt2: Case) -> None:
    assert residual_pt2.chain.names == residual.chain.names
    assert residual_pt2.chain.boundaries == residual.chain.boundaries
    _assert_same(residual_pt2.expected, residual.expected)
    chain = residual_pt2.chain
    shards = [chain.shard(0, 1), chain.shard(2, 2), chain.shard(3, 4)]
    _assert_same(_run(shards, residual.loaded.example_inputs), residual.expected)
    # Exported with static shapes: the batch is fixed too.
    assert not chain.batch_flexible
    with pytest.raises(
        ShapeMismatch, match="expected float32\\[1, 3, 16, 16\\], actual float32\\[2, 3, 16, 16\\]"
    ):
        chain.shard(0, 4).check_inputs([torch.randn(2, 3, 16, 16)])


def test_any_batch_size_when_the_chain_is_batch_generic(residual: Case) -> None:
    chain = residual.chain
    assert chain.batch_flexible
    x = torch.randn(3, 3, 16, 16)
    with torch.inference_mode():
        expected = residual.loaded.module(x)
    _assert_same(_run([chain.shard(0, 2), chain.shard(3, 4)], (x,)), (expected,))
    with pytest.raises(ShapeMismatch, match=r"input 1 of shard 3\.\.4: expected float32\[N, 8, 16, 16\]"):
        chain.shard(3, 4).check_inputs([torch.randn(3, 8, 16, 16), torch.randn(2, 8, 16, 16)])


def test_a_shard_holds_only_its_blocks_parameters(zoo: Case) -> None:
    model = zoo.loaded.module
    total = sum(p.numel() for p in model.parameters())
    total_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    n = len(zoo.chain)
    for k in (0, n // 2, n - 2):
        head, tail = zoo.chain.shard(0, k), zoo.chain.shard(k + 1, n - 1)
        assert sum(p.numel() for p in head.parameters()) + sum(p.numel() for p in tail.parameters()) == total
        assert head.param_bytes + tail.param_bytes == total_bytes
        assert 0 < head.param_bytes < total_bytes


def test_wrong_inputs_raise_shape_mismatch(residual: Case) -> None:
    shard = residual.chain.shard(2, 3)  # takes two float32[N, 8, 16, 16]
    ok = torch.randn(1, 8, 16, 16)
    cases = [
        ([ok], "shard 2..3: expected 2 input tensor(s), actual 1"),
        (
            [ok, ok.double()],
            "input 1 of shard 2..3: expected float32[N, 8, 16, 16], actual float64[1, 8, 16, 16]",
        ),
        ([ok, torch.randn(1, 8, 8, 16)], "actual float32[1, 8, 8, 16]"),
        (
            [torch.randn(8, 16, 16), ok],
            "input 0 of shard 2..3: expected float32[N, 8, 16, 16], actual float32[8",
        ),
        ([ok, "x"], "expected float32[N, 8, 16, 16], actual str"),
    ]
    for tensors, message in cases:
        with pytest.raises(ShapeMismatch) as info:
            shard.check_inputs(tensors)
        assert message in str(info.value)
    shard.check_inputs([ok, ok])


def test_out_of_range_shards_are_invalid_specs(residual: Case) -> None:
    for first, last in [(-1, 2), (3, 2), (0, 5)]:
        with pytest.raises(InvalidSpec, match="expected 0 <= first <= last <= 4"):
            residual.chain.shard(first, last)


def test_a_shard_keeps_only_its_own_parameters_alive(residual: Case, tmp_path: Path) -> None:
    model = residual_net().eval()
    head_weight = weakref.ref(model.head.weight)
    shard = split_model(model, residual.loaded.example_inputs).shard(1, 1)
    del model  # the chain is gone too: only the shard holds anything now
    gc.collect()
    assert head_weight() is None
    names = {n for n, _ in shard.named_parameters()}
    assert names == {"blocks.0.body.0.0.weight", "blocks.0.body.0.0.bias"}
    torch.save(shard.state_dict(), tmp_path / "shard.pt")  # plain tensors, savable


def test_split_of_a_bare_module_needs_example_inputs() -> None:
    with pytest.raises(InvalidSpec, match="example_inputs"):
        split_model(residual_net())


class _Holder(torch.nn.Module):
    """Stages in a ModuleList inside a custom module: the list is never called itself."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = torch.relu(stage(x))
        return x


class _Outer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _Holder()
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        if x.shape[-1] != 4:  # shape-dependent Python branch: symbolic_trace cannot follow it
            raise ValueError("expected 4 features")
        return {"logits": self.head(h), "features": h}


def test_module_lists_are_transparent_and_dict_outputs_become_tuples() -> None:
    torch.manual_seed(0)
    model = _Outer().eval()
    x = torch.randn(2, 4)
    chain = split_model(model, (x,))  # falls back to torch.export for the shape branch
    assert chain.names == ["body.stages.0", "body.stages.1", "body.stages.2", "head"]
    # The relu written in the holder's forward is glue: it rides with the stage before it.
    assert (
        len(chain.blocks[0].module.graph.find_nodes(op="call_function", target=torch.ops.aten.relu.default))
        == 1
    )
    expected = model(x)
    outputs = _run([chain.shard(0, 1), chain.shard(2, 3)], (x,))
    _assert_same(outputs, (expected["logits"], expected["features"]))  # dict order, flattened
