"""Block profiles: one per block, FLOPs where there is compute, bytes that match the cuts."""

from __future__ import annotations

import pytest
import torch

from amp4ec.planner.types import LayerProfile
from amp4ec.slicing import ModelSource, chain_input_bytes, load_model, profile_chain, split_model


@pytest.mark.parametrize(
    ("spec", "shape"), [("tests.model_zoo:residual_net", None), ("mobilenet_v2", (1, 3, 32, 32))]
)
def test_profile_matches_the_chain(spec: str, shape: tuple[int, ...] | None) -> None:
    loaded = load_model(ModelSource(spec, input_shape=shape))
    chain = split_model(loaded)
    threads = torch.get_num_threads()
    profiles = profile_chain(chain, loaded.example_inputs, repeats=2, warmup=1)
    assert torch.get_num_threads() == threads
    assert [p.name for p in profiles] == chain.names
    assert all(isinstance(p, LayerProfile) and p.compute_ms > 0 for p in profiles)
    for k, p in enumerate(profiles):
        out_bytes = sum(s.nbytes for s in chain.boundaries[k + 1])
        assert p.out_bytes == out_bytes
        assert p.act_bytes == out_bytes + sum(s.nbytes for s in chain.boundaries[k])
        assert p.param_bytes == chain.shard(k, k).param_bytes
        if "stem" in p.name or "body" in p.name or p.name.startswith("features"):
            assert p.flops > 0, p.name
    model = loaded.module
    assert sum(p.param_bytes for p in profiles) == sum(
        t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
    )
    assert chain_input_bytes(chain) == loaded.example_inputs[0].numel() * 4 == chain.input_bytes


def test_attention_flops_are_counted() -> None:
    # torch's FlopCounterMode has no formula for CPU attention; the profile adds one.
    loaded = load_model(ModelSource("vit_tiny"))
    chain = split_model(loaded)
    profiles = profile_chain(chain, loaded.example_inputs, repeats=1, warmup=0)
    layer = profiles[chain.names.index("encoder.layers.encoder_layer_0")]
    tokens, hidden, mlp = 197, 192, 768
    linear = 2 * tokens * hidden * (3 * hidden + hidden + 2 * mlp)  # qkv, out proj, MLP
    attention = 2 * 2 * tokens * tokens * hidden  # Q·Kᵀ and P·V
    assert layer.flops == linear + attention


def test_batch_sizes_are_profiled_only_when_asked_and_flexible() -> None:
    loaded = load_model(ModelSource("mobilenet_v2", input_shape=(1, 3, 32, 32)))
    chain = split_model(loaded)
    assert chain.batch_flexible
    plain = profile_chain(chain, loaded.example_inputs, repeats=1, warmup=0, tiles=False)
    assert all(p.batch_ms == () for p in plain)
    batched = profile_chain(
        chain, loaded.example_inputs, repeats=1, warmup=0, tiles=False, batch_sizes=(4, 2, 1)
    )
    for p in batched:
        assert [b for b, _ in p.batch_ms] == [2, 4]
        assert all(ms > 0 for _, ms in p.batch_ms)
        assert p.ms_at(2) == p.batch_ms[0][1] and p.ms_at(1) == p.compute_ms
    # Four images at once take longer than one (the work is there), whatever the per-image gain.
    total = sum(p.ms_at(4) for p in batched)
    assert total > sum(p.compute_ms for p in batched)


def test_an_inflexible_chain_records_no_batch_figures() -> None:
    loaded = load_model(ModelSource("tests.model_zoo:residual_net"))
    chain = split_model(loaded)
    chain.batch_flexible = False  # as for a chain whose shapes fix dim 0
    profiles = profile_chain(chain, loaded.example_inputs, repeats=1, warmup=0, tiles=False, batch_sizes=(2,))
    assert all(p.batch_ms == () for p in profiles)
