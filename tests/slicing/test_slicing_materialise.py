"""Shard-only materialisation: an agent's range is made from (seed, name) and equals the monolith's."""

from __future__ import annotations

from pathlib import Path

import torch

from amp4ec.node_agent.executor import build_stage
from amp4ec.slicing import ModelSource, load_model, split_model
from amp4ec.slicing.materialise import init_tensor, materialise
from amp4ec.wire.stage import StageConfig

SHAPE = (1, 3, 64, 64)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items()}


def test_a_zoo_model_can_stay_on_the_meta_device() -> None:
    lazy = load_model(ModelSource("resnet18", input_shape=SHAPE), materialise=False)
    assert lazy.lazy
    assert all(p.is_meta for p in lazy.module.parameters())
    eager = load_model(ModelSource("tests.model_zoo:residual_net"), materialise=False)
    assert not eager.lazy, "a user factory may carry buffers with meaning: it is built for real"


def test_a_stage_holds_only_its_range_made_exactly_as_in_the_monolith() -> None:
    source = ModelSource("resnet18", seed=3, input_shape=SHAPE)
    whole = load_model(source)
    chain = split_model(whole)
    first, last = 3, len(chain) - 3
    stage = build_stage(StageConfig("resnet18", first, last, seed=3, input_shape=SHAPE))
    assert not any(p.is_meta for p in stage.shard.parameters())
    assert stage.shard.param_bytes == chain.shard(first, last).param_bytes
    with torch.inference_mode():
        x = chain.shard(0, first - 1)(*whole.example_inputs)
        torch.testing.assert_close(stage.shard(*x), chain.shard(first, last)(*x), rtol=0, atol=0)


def test_weights_come_from_the_file_through_mmap(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(load_model(ModelSource("resnet18", seed=1, input_shape=SHAPE)).module.state_dict(), path)
    stage = build_stage(StageConfig("resnet18", 0, 4, weights=str(path), input_shape=SHAPE))
    seeded = build_stage(StageConfig("resnet18", 0, 4, seed=1, input_shape=SHAPE))
    a, b = _params(stage.shard), _params(seeded.shard)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_depends_on_seed_and_name_only() -> None:
    like = torch.empty(8, 4, 3, 3, device="meta")
    one = init_tensor("features.0.0.weight", like, 0)
    assert torch.equal(one, init_tensor("features.0.0.weight", like, 0))
    assert not torch.equal(one, init_tensor("features.0.0.weight", like, 1))
    assert not torch.equal(one, init_tensor("features.1.0.weight", like, 0))
    assert torch.equal(init_tensor("bn.running_var", torch.empty(4, device="meta"), 0), torch.ones(4))


def test_a_shared_tensor_stays_shared() -> None:
    shared = torch.nn.Parameter(torch.empty(3, 3, device="meta"))
    a, b = torch.nn.Module(), torch.nn.Module()
    a.w = shared
    b.w = shared
    materialise([a, b], seed=0)
    assert a.w is b.w and not a.w.is_meta
