"""Loading models from specs: zoo names, factories, .pt2 archives, weights, and every error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from amp4ec.errors import InvalidSpec, ModelNotFound, ShapeMismatch
from amp4ec.slicing import ModelSource, load_model, split_model
from tests.model_zoo import residual_net

RESIDUAL = "tests.model_zoo:residual_net"


def _output(source: ModelSource, x: torch.Tensor | None = None) -> torch.Tensor:
    loaded = load_model(source)
    with torch.inference_mode():
        return loaded.module(*(loaded.example_inputs if x is None else (x,)))


def test_factory_spec_uses_its_declared_input_shape_and_is_deterministic() -> None:
    a, b = load_model(ModelSource(RESIDUAL, seed=5)), load_model(ModelSource(RESIDUAL, seed=5))
    assert a.name == RESIDUAL and not a.module.training
    assert a.example_inputs[0].shape == residual_net.input_shape
    assert torch.equal(a.example_inputs[0], b.example_inputs[0])
    for (ka, va), (kb, vb) in zip(a.module.state_dict().items(), b.module.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    other = load_model(ModelSource(RESIDUAL, seed=6))
    assert not torch.equal(other.module.stem.weight, a.module.stem.weight)


def test_loading_leaves_the_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    load_model(ModelSource(RESIDUAL, seed=123))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_zoo_names_and_input_shape_override() -> None:
    loaded = load_model(ModelSource("resnet18", input_shape=(1, 3, 32, 32)))
    assert loaded.name == "resnet18" and loaded.example_inputs[0].shape == (1, 3, 32, 32)


@pytest.mark.parametrize(
    ("spec", "error", "words"),
    [
        ("resnet1000", ModelNotFound, ["model:", "resnet1000", "mobilenet_v2", "resnet18", "vit_tiny"]),
        ("/no/such/model.pt2", ModelNotFound, ["model:", "/no/such/model.pt2", "does not exist"]),
        ("no_such_package_xyz.models:net", ModelNotFound, ["model:", "no_such_package_xyz.models"]),
        ("tests.model_zoo:nope", ModelNotFound, ["model:", "has no attribute 'nope'"]),
        ("tests.model_zoo:ResidualNet.nope", ModelNotFound, ["model:", "ResidualNet.nope"]),
        ("tests.model_zoo:", ModelNotFound, ["model:", "package.module:factory"]),
        ("", InvalidSpec, ["model:"]),
        ("tests.model_zoo:no_shape_net", InvalidSpec, ["input_shape:", "tests.model_zoo:no_shape_net"]),
        ("torch:randn", InvalidSpec, ["model:", "torch:randn"]),
    ],
)
def test_bad_specs_name_the_field(spec: str, error: type[Exception], words: list[str]) -> None:
    with pytest.raises(error) as info:
        load_model(ModelSource(spec))
    assert "\n" not in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_factory_without_default_shape_takes_input_shape() -> None:
    loaded = load_model(ModelSource("tests.model_zoo:no_shape_net", input_shape=(2, 4)))
    assert loaded.example_inputs[0].shape == (2, 4)
    assert len(split_model(loaded)) == 2


@pytest.mark.parametrize("shape", [(), (1, 0, 4), (1, -3), ("a", 3)])
def test_malformed_input_shape(shape: tuple) -> None:
    with pytest.raises(InvalidSpec, match="input_shape: expected positive integers"):
        load_model(ModelSource(RESIDUAL, input_shape=shape))


def test_an_input_shape_the_model_cannot_take_fails_at_split() -> None:
    loaded = load_model(ModelSource(RESIDUAL, input_shape=(1, 5, 16, 16)))  # 5 channels, conv wants 3
    with pytest.raises(
        ShapeMismatch, match=r"input_shape: model tests.model_zoo:residual_net does not run on"
    ):
        split_model(loaded)


def test_weights_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(load_model(ModelSource(RESIDUAL, seed=1)).module.state_dict(), path)
    x = torch.randn(1, 3, 16, 16)
    with_weights = _output(ModelSource(RESIDUAL, seed=0, weights=str(path)), x)
    torch.testing.assert_close(with_weights, _output(ModelSource(RESIDUAL, seed=1), x), rtol=0, atol=0)
    assert not torch.allclose(with_weights, _output(ModelSource(RESIDUAL, seed=0), x))


def test_zoo_weights_round_trip_under_torchvision_names(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(load_model(ModelSource("resnet18", seed=1)).module.state_dict(), path)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(
        _output(ModelSource("resnet18", weights=str(path)), x), _output(ModelSource("resnet18", seed=1), x)
    )


def test_weight_errors(tmp_path: Path) -> None:
    state = load_model(ModelSource(RESIDUAL)).module.state_dict()
    renamed = {k.replace("stem.", "trunk."): v for k, v in state.items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(InvalidSpec) as info:
        load_model(ModelSource(RESIDUAL, weights=str(tmp_path / "renamed.pt")))
    message = str(info.value)
    assert message.startswith("weights:")
    assert "missing 2 keys (stem.bias, stem.weight)" in message
    assert "unexpected 2 keys (trunk.bias, trunk.weight)" in message

    state["head.weight"] = torch.zeros(3, 8)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(InvalidSpec, match=r"weights: .* does not fit model .*head.weight"):
        load_model(ModelSource(RESIDUAL, weights=str(tmp_path / "shape.pt")))

    with pytest.raises(ModelNotFound, match=r"weights: file .*missing\.pt does not exist"):
        load_model(ModelSource(RESIDUAL, weights=str(tmp_path / "missing.pt")))

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidSpec, match="weights: cannot load"):
        load_model(ModelSource(RESIDUAL, weights=str(tmp_path / "junk.pt")))


def test_pt2_archive_shapes_and_override(tmp_path: Path) -> None:
    loaded = load_model(ModelSource(RESIDUAL))
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(loaded.module, loaded.example_inputs), path)
    archive = load_model(ModelSource(str(path)))
    assert archive.name == "net" and archive.example_inputs[0].shape == (1, 3, 16, 16)
    torch.testing.assert_close(archive.example_inputs[0], loaded.example_inputs[0])
    with pytest.raises(
        ShapeMismatch, match=r"input_shape: .* exported for \[1, 3, 16, 16\].*actual \[1, 3, 8, 8\]"
    ):
        load_model(ModelSource(str(path), input_shape=(1, 3, 8, 8)))
    (tmp_path / "junk.pt2").write_bytes(b"nope")
    with pytest.raises(InvalidSpec, match=r"model: .*junk\.pt2 is not a torch\.export archive"):
        load_model(ModelSource(str(tmp_path / "junk.pt2")))
