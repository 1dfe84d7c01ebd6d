"""Row tiles: stitched tiles equal the monolith, and the halo equals the rows that really matter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from amp4ec.errors import InvalidSpec, ShapeMismatch
from amp4ec.planner import TileRows
from amp4ec.slicing import BlockChain, ModelSource, load_model, split_model
from amp4ec.slicing.tiles import TiledRange, fit_tile_cost, row_maps, split_rows, stitch, tileable_prefix

WEIGHTS = {2: [1.0, 0.4], 3: [1.0, 0.6, 0.4], 4: [1.0, 0.7, 0.5, 0.3]}
"""Unequal tile heights, proportional to node speeds."""


def _check_tiles(chain: BlockChain, inputs: tuple[torch.Tensor, ...], last: int, n: int) -> None:
    tiled = TiledRange(chain, 0, last)
    rows = split_rows(tiled.height, WEIGHTS[n])
    assert len({b - a for a, b in rows}) > 1, "heights should differ"
    with torch.inference_mode():
        expected = chain.shard(0, last)(*inputs)
        got = stitch([tiled.run(tiled.scatter(inputs, r), r) for r in rows])
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def _deepest(chain: BlockChain, min_height: int) -> int:
    """The last leading block whose output still has ``min_height`` rows."""
    k = tileable_prefix(chain)
    assert k > 0
    return max(j for j in range(k) if chain.boundaries[j + 1][0].shape[2] >= min_height)


@pytest.mark.parametrize("model", ["mobilenet_v2", "resnet18", "resnet50"])
def test_zoo_cnn_tiles_equal_the_monolith(model: str) -> None:
    loaded = load_model(ModelSource(model, input_shape=(1, 3, 32, 32)))
    chain = split_model(loaded)
    last = _deepest(chain, 8)
    for n in (2, 3, 4):
        _check_tiles(chain, loaded.example_inputs, last, n)
    _check_tiles(chain, loaded.example_inputs, 0, 3)  # a single block too


class _UserNet(nn.Module):
    """What a user's CNN may hold: strides, 'same' and dilated convs, BN, a ceil-mode max pool,
    an average pool, a residual add, a channel concat — then a global pool and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.a = nn.Conv2d(8, 8, 3, padding="same", dilation=2)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(16, 8, 1)
        self.avg = nn.AvgPool2d(3, stride=1, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x))
        y = torch.relu(self.a(x)) + x
        z = self.c(torch.cat([self.b(y), y], dim=1))
        return self.head(self.avg(z).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def user_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("user") / "net.pt2"
    torch.manual_seed(0)
    torch.export.save(torch.export.export(_UserNet().eval(), (torch.randn(1, 3, 40, 40),)), path)
    return path


@pytest.mark.parametrize("n", [2, 3, 4])
def test_user_pt2_with_residuals_tiles_equal_the_monolith(user_pt2: Path, n: int) -> None:
    loaded = load_model(ModelSource(str(user_pt2)))
    chain = split_model(loaded)
    k = tileable_prefix(chain)
    assert 0 < k < len(chain), chain  # the global pool and head stay layer-wise
    _check_tiles(chain, loaded.example_inputs, k - 1, n)


def test_cuts_carrying_a_skip_are_tiled_too() -> None:
    """tests.model_zoo's residual net: every cut in its body carries the activation and the skip."""
    loaded = load_model(ModelSource("tests.model_zoo:residual_net"))
    chain = split_model(loaded)
    assert tileable_prefix(chain) >= 3 and len(chain.boundaries[2]) == 2
    for n in (2, 3, 4):
        _check_tiles(chain, loaded.example_inputs, 2, n)


def test_non_tileable_blocks_and_wrong_tiles_are_refused() -> None:
    loaded = load_model(ModelSource("resnet18", input_shape=(1, 3, 32, 32)))
    chain = split_model(loaded)
    k = tileable_prefix(chain)
    with pytest.raises(InvalidSpec, match=rf"block {k} \(avgpool\) is not tileable"):
        TiledRange(chain, 0, k)
    tiled = TiledRange(chain, 0, 0)
    with pytest.raises(ShapeMismatch, match=r"expected .* actual"):
        tiled.run(loaded.example_inputs, (0, 4))  # the whole image, not the tile's rows
    with pytest.raises(InvalidSpec, match="tiles"):
        split_rows(3, [1.0, 1.0, 1.0, 1.0])


def test_split_rows_is_proportional_and_covers_every_row() -> None:
    assert split_rows(10, [1.0, 0.6, 0.4]) == [(0, 5), (5, 8), (8, 10)]
    for height in range(4, 40):
        rows = split_rows(height, [1.0, 0.3, 0.05, 0.7])
        assert rows[0][0] == 0 and rows[-1][1] == height
        assert all(
            a < b and b == c for (a, b), (c, _) in zip(rows, [*rows[1:], (height, height)], strict=True)
        )


# ---- halo against brute force -----------------------------------------------------------------
_layer = st.tuples(
    st.integers(1, 5),  # kernel
    st.integers(1, 3),  # stride
    st.integers(1, 2),  # dilation
    st.sampled_from(["conv", "max", "avg"]),
)


def _stack(layers: list[tuple[int, int, int, str]]) -> nn.Sequential:
    mods: list[nn.Module] = []
    for k, s, d, kind in layers:
        if kind == "conv":
            conv = nn.Conv2d(2, 2, k, stride=s, padding=(d * (k - 1)) // 2, dilation=d)
            nn.init.uniform_(conv.weight, 0.1, 1.0)  # positive: no dependency cancels out
            mods.append(conv)
        elif kind == "max":
            mods.append(nn.MaxPool2d(k, stride=s, padding=k // 2, dilation=d))
        else:
            mods.append(nn.AvgPool2d(k, stride=s, padding=k // 2))
    return nn.Sequential(*mods).eval()


def _rows_that_matter(model: nn.Module, x: torch.Tensor, a: int, b: int) -> list[int]:
    """Brute force: the input rows that, raised far above the rest, change output rows a..b-1."""
    with torch.inference_mode():
        base = model(x)[:, :, a:b]
        rows = []
        for i in range(x.shape[2]):
            bumped = x.clone()
            bumped[:, :, i] += 1000.0
            if not torch.equal(model(bumped)[:, :, a:b], base):
                rows.append(i)
    return rows


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.lists(_layer, min_size=1, max_size=4),
    height=st.integers(8, 28),
    cut=st.floats(0.0, 1.0),
    span=st.floats(0.0, 1.0),
)
def test_halo_is_the_hull_of_the_rows_that_matter(
    layers: list[tuple[int, int, int, str]], height: int, cut: float, span: float
) -> None:
    torch.manual_seed(0)
    model = _stack(layers)
    x = torch.rand(1, 2, height, height) + 0.1
    try:
        with torch.inference_mode():
            model(x)
    except RuntimeError:
        return  # the stack shrinks this input to nothing
    chain = split_model(model, (x,), check_batch=False)
    tiled = TiledRange(chain, 0, len(chain) - 1)
    out_h = tiled.height
    a = min(out_h - 1, int(cut * out_h))
    b = a + 1 + int(span * (out_h - a - 1))
    ((lo, hi),) = tiled.input_rows((a, b))
    rows = _rows_that_matter(model, x, a, b)
    # No row matters when the output rows read only padding (a dilated kernel on one row).
    assert not rows or (lo <= rows[0] and rows[-1] < hi), (rows, (lo, hi))
    if rows and all(d == 1 for _, _, d, kind in layers if kind != "avg"):
        assert (lo, hi) == (rows[0], rows[-1] + 1)  # no dilation: the hull is tight
    with torch.inference_mode():
        torch.testing.assert_close(tiled.run(tiled.scatter((x,), (a, b)), (a, b))[0], model(x)[:, :, a:b])


def test_the_tile_cost_is_the_line_through_the_whole_and_the_band() -> None:
    # Whole as a tile 1.2× the plain block, a quarter-share band 0.5×: 0.5 = f + (1.2 - f)/4.
    fixed, overhead = fit_tile_cost(1.2, 0.5, 0.25)
    assert fixed == pytest.approx((0.5 - 0.3) / 0.75) and overhead == pytest.approx(0.2)
    g = TileRows(8, 8, tuple(range(8)), tuple(range(1, 9)), fixed=fixed, overhead=overhead)
    assert g.work(1.0, (0, 8)) == pytest.approx(1.2) and g.work(1.0, (3, 5)) == pytest.approx(0.5)
    assert fit_tile_cost(1.0, 0.25, 0.25) == (0.0, 0.0)  # proportional: today's model
    assert fit_tile_cost(0.9, 0.1, 0.25) == (0.0, 0.0)  # noise below the line: clamped
    assert fit_tile_cost(1.0, 1.5, 0.25) == (1.0, 0.0)  # a band dearer than the block: at most all


def test_row_maps_measures_every_tileable_blocks_cost() -> None:
    loaded = load_model(ModelSource("resnet18"))
    chain = split_model(loaded)
    maps = row_maps(chain, loaded.example_inputs)
    k = tileable_prefix(chain)
    assert all(m is not None for m in maps[:k]) and all(m is None for m in maps[k:])
    for m in maps[:k]:
        assert m is not None and 0.0 <= m.fixed <= 1.0 and m.overhead >= 0.0
