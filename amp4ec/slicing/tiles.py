"""Spatial tiles: a range of convolutional blocks run on horizontal stripes of the feature map.

A tile computes output rows ``[a, b)`` of a block range from only the input rows those rows
depend on (its rows plus a *halo*), so N tiles on N nodes split one request's work. The halo
comes from the graph, never from per-model tables:

1. Every node of a block's graph is classified (``_classify``): a *window* op (convolution,
   max or average pooling: kernel, stride, top padding and dilation along H), a *pointwise*
   op (normalisation, activations, residual additions, channel concatenation: row ``r`` of
   the output needs row ``r`` of each input), or neither — a block holding anything else
   (global pooling, flatten, linear) is not tileable.
2. Backward, from the rows each output needs, every value gets the hull of the rows its
   users need: a window maps output rows ``[a, b)`` to input rows
   ``[a·s − p, (b − 1)·s − p + d·(k − 1) + 1)``, clipped to the image; a pointwise op passes
   its rows through; a value read twice (a residual) needs the hull of both reads.
3. Forward, each node computes exactly its rows: a window op slices its input, pads the
   rows outside the image itself (zeros, or −inf for max pooling) and runs with no H
   padding, so the result equals the monolith's rows; pointwise ops slice their inputs.

Stitching the tiles' outputs along H gives the monolith's output. ``RowMap`` hands the
planner the same geometry as plain numbers (``amp4ec.planner.types.TileRows``).
"""

from __future__ import annotations

import math
import operator
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from amp4ec.errors import InvalidSpec, ShapeMismatch
from amp4ec.planner.tiles import split_rows
from amp4ec.planner.types import TileRows
from amp4ec.slicing.blocks import BlockChain
from amp4ec.wire import codec

__all__ = [
    "Rows",
    "TiledRange",
    "codec_ns_per_byte",
    "fit_tile_cost",
    "row_maps",
    "split_rows",
    "stitch",
    "tileable_prefix",
]

Rows = tuple[int, int]
"""Half-open row interval ``[start, stop)`` along H (dim 2) of an NCHW tensor."""


def _hull(a: Rows | None, b: Rows) -> Rows:
    if b[0] >= b[1]:
        return a if a is not None else b
    if a is None or a[0] >= a[1]:
        return b
    return (min(a[0], b[0]), max(a[1], b[1]))


def stitch(pieces: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Tiles' outputs (top first, each a tuple of tensors) joined along H."""
    return tuple(torch.cat(parts, dim=2) for parts in zip(*pieces, strict=True))


# ---- what each graph node does to rows -----------------------------------------------------
@dataclass(frozen=True)
class _Window:
    """A convolution or pooling along H: output row r reads input rows r·s − p … + d·(k − 1)."""

    kernel: int
    stride: int
    pad_top: int
    dilation: int
    pad_value: float
    run: Any
    """run(x, env_args, pad_h) → output rows of ``x`` padded by ``pad_h`` rows at both ends as
    the original op pads (W as the original)."""
    own_pad: bool = True
    """The op pads H by ``pad_top`` at both ends itself (False: asymmetric "same" padding)."""

    def needs(self, rows: Rows, height: int) -> Rows:
        lo = rows[0] * self.stride - self.pad_top
        hi = (rows[1] - 1) * self.stride - self.pad_top + self.dilation * (self.kernel - 1) + 1
        return (max(0, lo), min(height, hi))

    def apply(self, x: torch.Tensor, have: Rows, rows: Rows, height: int, env: Any) -> torch.Tensor:
        """Output ``rows`` from ``x`` holding input rows ``have``, the rows beyond the image
        padded as the original op pads them."""
        lo = rows[0] * self.stride - self.pad_top
        hi = (rows[1] - 1) * self.stride - self.pad_top + self.dilation * (self.kernel - 1) + 1
        a, b = max(0, lo), min(height, hi)
        part = x.narrow(2, a - have[0], max(0, b - a))
        top, bottom = a - lo, hi - b
        if not (top or bottom):
            return self.run(part, env, 0)
        skip, rest = divmod(self.pad_top - top, self.stride)
        if self.own_pad and not rest:
            # At the image's edge the op pads H itself, as the monolith's does: no padded copy,
            # and the monolith's kernel (some CPU kernels are several times slower on an input
            # padded by hand). Rows it computes from its padding at the band's other edge drop.
            return self.run(part, env, self.pad_top).narrow(2, skip, rows[1] - rows[0])
        return self.run(F.pad(part, (0, 0, top, bottom), value=self.pad_value), env, 0)


_POINTWISE_MODULES = (
    nn.BatchNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.GELU,
    nn.ELU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
)
_POINTWISE_FUNCTIONS = {
    operator.add,
    operator.mul,
    operator.sub,
    operator.truediv,
    operator.iadd,
    torch.add,
    torch.mul,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    F.relu,
    F.relu6,
    F.hardtanh,
    F.silu,
    F.gelu,
    F.hardswish,
    F.dropout,
    F.batch_norm,
}
_POINTWISE_ATEN = {
    "relu",
    "relu_",
    "hardtanh",
    "hardtanh_",
    "add",
    "add_",
    "mul",
    "mul_",
    "sub",
    "div",
    "sigmoid",
    "tanh",
    "silu",
    "silu_",
    "gelu",
    "hardswish",
    "hardswish_",
    "hardsigmoid",
    "leaky_relu",
    "leaky_relu_",
    "elu",
    "clone",
    "dropout",
    "alias",
    "detach",
    "contiguous",
    "batch_norm",
    "_native_batch_norm_legit_no_training",
}
_POINTWISE_METHODS = {"relu", "relu_", "add", "add_", "mul", "mul_", "sigmoid", "clone", "contiguous"}
_POINTWISE = "pointwise"
_GETITEM = "getitem"


def _aten_name(target: Any) -> str | None:
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.removeprefix("aten::")
    return None


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _arg(args: Sequence[Any], kwargs: dict[str, Any], i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _conv_window(weight_shape: Sequence[int], stride: Any, padding: Any, dilation: Any, groups: int) -> Any:
    """A window for ``conv2d`` (weight from the env at run time, padding int, pair or 'same'/'valid')."""
    kh, kw = weight_shape[2], weight_shape[3]
    (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0, 0, 0)
        else:  # "same" (stride 1): PyTorch puts the odd row/column at the end
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pads = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    else:
        ph, pw = _pair(padding)
        pads = (ph, ph, pw, pw)
    left, right = pads[2], pads[3]

    def run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pad_h: int) -> torch.Tensor:
        if left == right:
            return F.conv2d(x, weight, bias, (sh, sw), (pad_h, left), (dh, dw), groups)
        return F.conv2d(F.pad(x, (left, right)), weight, bias, (sh, sw), (pad_h, 0), (dh, dw), groups)

    return kh, sh, pads[0], dh, run, pads[0] == pads[1]


def _classify(node: fx.Node, gm: fx.GraphModule) -> _Window | str | None:
    """What ``node`` does to rows: a window, pointwise, a getitem, or None (not tileable)."""
    target, args, kwargs = node.target, node.args, dict(node.kwargs)
    if node.op == "call_module":
        module = gm.get_submodule(str(target))
        if isinstance(module, _POINTWISE_MODULES):
            return _POINTWISE
        if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros":
            k, s, p, d, conv, even = _conv_window(
                module.weight.shape, module.stride, module.padding, module.dilation, module.groups
            )
            return _Window(
                k, s, p, d, 0.0, lambda x, env, pad: conv(x, module.weight, module.bias, pad), even
            )
        if isinstance(module, nn.MaxPool2d) and not module.return_indices:
            return _max_pool(
                module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode
            )
        if isinstance(module, nn.AvgPool2d):
            return _avg_pool(
                module.kernel_size,
                module.stride,
                module.padding,
                module.ceil_mode,
                module.count_include_pad,
                module.divisor_override,
            )
        return None
    if node.op == "call_method":
        return _POINTWISE if target in _POINTWISE_METHODS else None
    if node.op != "call_function":
        return None
    if target is operator.getitem:
        return _GETITEM
    if target is torch.cat or _aten_name(target) == "cat":
        dim = _arg(args, kwargs, 1, "dim", 0)
        return _POINTWISE if dim in (1, -3) else None
    aten = _aten_name(target)
    if target in _POINTWISE_FUNCTIONS or aten in _POINTWISE_ATEN:
        if aten == "batch_norm" and _arg(args, kwargs, 5, "training", False):
            return None
        return _POINTWISE
    if target is F.conv2d or aten in ("conv2d", "convolution"):
        if aten == "convolution":
            if _arg(args, kwargs, 6, "transposed", False):
                return None
            stride, padding, dilation = args[3], args[4], args[5]
            groups = _arg(args, kwargs, 8, "groups", 1)
        else:
            stride = _arg(args, kwargs, 3, "stride", 1)
            padding = _arg(args, kwargs, 4, "padding", 0)
            dilation = _arg(args, kwargs, 5, "dilation", 1)
            groups = _arg(args, kwargs, 6, "groups", 1)
        weight = args[1]
        shape = weight.meta.get("shape") if isinstance(weight, fx.Node) else None
        if shape is None or len(shape) != 4:
            return None
        k, s, p, d, conv, even = _conv_window(shape, stride, padding, dilation, groups)
        bias = _arg(args, kwargs, 2, "bias", None)
        return _Window(k, s, p, d, 0.0, lambda x, env, pad: conv(x, env(weight), env(bias), pad), even)
    if target is F.max_pool2d or aten == "max_pool2d":
        kernel = _arg(args, kwargs, 1, "kernel_size", None)
        return _max_pool(
            kernel,
            _arg(args, kwargs, 2, "stride", None) or kernel,
            _arg(args, kwargs, 3, "padding", 0),
            _arg(args, kwargs, 4, "dilation", 1),
            _arg(args, kwargs, 5, "ceil_mode", False),
        )
    if target is F.avg_pool2d or aten == "avg_pool2d":
        kernel = _arg(args, kwargs, 1, "kernel_size", None)
        return _avg_pool(
            kernel,
            _arg(args, kwargs, 2, "stride", None) or kernel,
            _arg(args, kwargs, 3, "padding", 0),
            _arg(args, kwargs, 4, "ceil_mode", False),
            _arg(args, kwargs, 5, "count_include_pad", True),
            _arg(args, kwargs, 6, "divisor_override", None),
        )
    return None


def _max_pool(kernel: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: bool) -> _Window:
    (kh, kw), (sh, sw) = _pair(kernel), _pair(stride if stride else kernel)
    (ph, pw), (dh, dw) = _pair(padding), _pair(dilation)

    def run(x: torch.Tensor, env: Any, pad_h: int) -> torch.Tensor:
        # The rows kept are whole windows either way; ceil_mode only adds one at the end.
        return F.max_pool2d(x, (kh, kw), (sh, sw), (pad_h, pw), (dh, dw), ceil_mode)

    return _Window(kh, sh, ph, dh, -math.inf, run)


def _avg_pool(
    kernel: Any, stride: Any, padding: Any, ceil_mode: bool, count_include_pad: bool, divisor: int | None
) -> _Window | None:
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride if stride else kernel), _pair(padding)
    if ceil_mode or (ph and not count_include_pad and divisor is None):
        return None  # the divisor at the border would change with the explicit padding

    def run(x: torch.Tensor, env: Any, pad_h: int) -> torch.Tensor:
        return F.avg_pool2d(x, (kh, kw), (sh, sw), (pad_h, pw), False, count_include_pad, divisor)

    return _Window(kh, sh, ph, 1, 0.0, run)


# ---- one block's graph, tiled ---------------------------------------------------------------
class _TiledBlock:
    """A block's graph with each node classified and each value's height recorded."""

    def __init__(self, gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> None:
        self.gm = gm
        self.heights: dict[fx.Node, int | None] = {}
        self.values: dict[fx.Node, Any] = {}
        self.kinds: dict[fx.Node, _Window | str | None] = {}
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.output = next(n for n in gm.graph.nodes if n.op == "output")
        self.outputs: list[fx.Node] = list(self.output.args[0])
        self.why: str | None = None
        self.result = self._record(inputs)

    def _record(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Run once on full inputs, keeping each value's height (None: not an NCHW tensor) and
        shape (for weights); classify every compute node."""
        interp = fx.Interpreter(self.gm)
        env: dict[fx.Node, Any] = {}
        it = iter(inputs)
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                env[n] = next(it)
            elif n.op == "output":
                break
            else:
                args, kwargs = _resolve(n, env)
                env[n] = getattr(interp, n.op)(n.target, args, kwargs)
            value = env[n]
            if isinstance(value, torch.Tensor):
                n.meta["shape"] = tuple(value.shape)
            self.heights[n] = value.shape[2] if isinstance(value, torch.Tensor) and value.dim() == 4 else None
            if n.op in ("call_module", "call_function", "call_method"):
                self.kinds[n] = kind = _classify(n, self.gm)
                if kind is None and self.why is None:
                    self.why = f"{n.op} {_target_name(n)} is not a convolution, pooling or pointwise op"
        for n in self.outputs:
            if self.heights.get(n) is None and self.why is None:
                self.why = f"output {n.name} is not an NCHW tensor"
        for n in self.placeholders:
            if self.heights.get(n) is None and self.why is None:
                self.why = f"input {n.name} is not an NCHW tensor"
        return tuple(env[n] for n in self.outputs)

    def needs(self, out_rows: Sequence[Rows]) -> dict[fx.Node, Rows]:
        """Rows of every value the outputs ``out_rows`` (one interval per output) depend on."""
        req: dict[fx.Node, Rows | None] = {}
        for n, rows in zip(self.outputs, out_rows, strict=True):
            req[n] = _hull(req.get(n), rows)
        for n in reversed(list(self.gm.graph.nodes)):
            rows = req.get(n)
            if rows is None or n.op in ("placeholder", "get_attr", "output"):
                continue
            kind = self.kinds[n]
            spatial = [a for a in n.all_input_nodes if self.heights.get(a) is not None and a.op != "get_attr"]
            if isinstance(kind, _Window):
                src = n.args[0]
                assert isinstance(src, fx.Node)
                height = self.heights[src]
                assert height is not None
                req[src] = _hull(req.get(src), kind.needs(rows, height))
            else:
                for a in spatial:
                    req[a] = _hull(req.get(a), rows)
                if kind == _GETITEM and n.all_input_nodes:
                    src = n.all_input_nodes[0]
                    req[src] = _hull(req.get(src), rows)
        return {n: r for n, r in req.items() if r is not None}

    def run(
        self,
        inputs: Sequence[torch.Tensor],
        in_rows: Sequence[Rows],
        req: dict[fx.Node, Rows],
        out_rows: Sequence[Rows],
    ) -> tuple:
        """Rows ``out_rows`` of each output (``req`` from ``needs(out_rows)``), given the inputs'
        rows ``in_rows``."""
        env: dict[fx.Node, Any] = {}
        have: dict[fx.Node, Rows] = {}
        interp = fx.Interpreter(self.gm)
        for n, t, rows in zip(self.placeholders, inputs, in_rows, strict=True):
            env[n], have[n] = t, rows

        def value(v: Any) -> Any:
            return env[v] if isinstance(v, fx.Node) else v

        def at(a: fx.Node, rows: Rows) -> Any:
            """Value ``a`` cut to ``rows`` (its own rows when it is not row-indexed)."""
            v = env[a]
            if a not in have or self.heights.get(a) is None or not isinstance(v, torch.Tensor):
                return v
            got = have[a]
            if got == rows:
                return v
            # A copy: an in-place op on a view would change rows another reader still needs.
            return v.narrow(2, rows[0] - got[0], rows[1] - rows[0]).contiguous()

        for n in self.gm.graph.nodes:
            if n.op in ("placeholder", "output") or (n.op != "get_attr" and n not in req):
                continue
            if n.op == "get_attr":
                env[n] = interp.fetch_attr(str(n.target))
                continue
            rows = req[n]
            kind = self.kinds[n]
            if isinstance(kind, _Window):
                src = n.args[0]
                env[n] = kind.apply(env[src], have[src], rows, self.heights[src], value)
            elif kind == _GETITEM:
                src = n.args[0]
                env[n] = env[src][n.args[1]]
            else:
                args = fx.node.map_arg(n.args, lambda a, rows=rows: at(a, rows))
                kwargs = fx.node.map_arg(n.kwargs, lambda a, rows=rows: at(a, rows))
                env[n] = getattr(interp, n.op)(n.target, args, kwargs)
            have[n] = rows
        return tuple(at(n, r) for n, r in zip(self.outputs, out_rows, strict=True))


def _resolve(n: fx.Node, env: dict[fx.Node, Any]) -> tuple[Any, Any]:
    args = fx.node.map_arg(n.args, lambda a: env[a])
    kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
    return args, kwargs


def _target_name(n: fx.Node) -> str:
    return str(n.target) if n.op != "call_function" else getattr(n.target, "__name__", str(n.target))


# ---- a range of blocks ----------------------------------------------------------------------
class TiledRange:
    """Blocks ``first..last`` of a chain, run as row tiles.

    Built from full-size example inputs of block ``first`` (zeros of the cut's specs by
    default), which it runs once to learn every value's height. Raises InvalidSpec naming the
    block and op when a block is not tileable.
    """

    def __init__(
        self,
        chain: BlockChain,
        first: int,
        last: int,
        inputs: Sequence[torch.Tensor] | None = None,
    ) -> None:
        if not 0 <= first <= last < len(chain):
            raise InvalidSpec(f"tiles: blocks {first}..{last} are not in 0..{len(chain) - 1}")
        self.first, self.last = first, last
        self.in_specs = chain.boundaries[first]
        self.out_specs = chain.boundaries[last + 1]
        xs: tuple[torch.Tensor, ...] = tuple(inputs) if inputs is not None else _zeros(self.in_specs)
        self.blocks: list[_TiledBlock] = []
        with torch.inference_mode():
            for j in range(first, last + 1):
                block = _TiledBlock(chain.blocks[j].module, xs)
                if block.why is not None:
                    raise InvalidSpec(
                        f"tiles: block {j} ({chain.blocks[j].name}) is not tileable: {block.why}"
                    )
                self.blocks.append(block)
                xs = block.result
        heights = {s.shape[2] for s in self.out_specs}
        if len(heights) != 1:
            raise InvalidSpec(f"tiles: the outputs of block {last} differ in height ({sorted(heights)})")
        self.height = heights.pop()
        """Rows of the range's output (the tiles partition them)."""

    def input_rows(self, rows: Rows) -> list[Rows]:
        """Rows of each input tensor that output ``rows`` depend on (the tile's input + halo)."""
        return self._plan(rows)[0]

    def _plan(self, rows: Rows) -> tuple[list[Rows], list[tuple[dict[fx.Node, Rows], list[Rows]]]]:
        """Rows of the range's inputs, and per block (in order) its values' rows and outputs' rows."""
        out = [rows] * len(self.out_specs)
        steps: list[tuple[dict[fx.Node, Rows], list[Rows]]] = []
        for block in reversed(self.blocks):
            req = block.needs(out)
            steps.append((req, out))
            out = [req.get(p, (0, 0)) for p in block.placeholders]
        return out, steps[::-1]

    def run(self, inputs: Sequence[torch.Tensor], rows: Rows) -> tuple[torch.Tensor, ...]:
        """Output ``rows`` of the range from ``inputs`` = exactly ``input_rows(rows)`` of each input."""
        in_rows, steps = self._plan(rows)
        for i, (t, r, spec) in enumerate(zip(inputs, in_rows, self.in_specs, strict=True)):
            expected = (*spec.shape[:2], r[1] - r[0], *spec.shape[3:])
            if tuple(t.shape) != expected:
                raise ShapeMismatch(
                    f"input {i} of tile rows {rows[0]}..{rows[1] - 1} of blocks {self.first}..{self.last}: "
                    f"expected {list(expected)} (rows {r[0]}..{r[1] - 1}), actual {list(t.shape)}"
                )
        xs: tuple[torch.Tensor, ...] = tuple(inputs)
        have = in_rows
        for block, (req, out_rows) in zip(self.blocks, steps, strict=True):
            xs = block.run(xs, have, req, out_rows)
            have = out_rows
        return xs

    def scatter(self, inputs: Sequence[torch.Tensor], rows: Rows) -> tuple[torch.Tensor, ...]:
        """The slices of full-size ``inputs`` that the tile for output ``rows`` receives."""
        return tuple(
            t.narrow(2, r[0], r[1] - r[0]).contiguous()
            for t, r in zip(inputs, self.input_rows(rows), strict=True)
        )


def _zeros(specs: Sequence[Any]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.zeros(s.shape, dtype=s.dtype) for s in specs)


def tileable_prefix(chain: BlockChain, start: int = 0) -> int:
    """How many blocks from ``start`` on can be tiled together (0: not even block ``start``)."""
    xs = _zeros(chain.boundaries[start])
    count = 0
    with torch.inference_mode():
        for j in range(start, len(chain)):
            block = _TiledBlock(chain.blocks[j].module, xs)
            if block.why is not None or any(len(s.shape) != 4 for s in chain.boundaries[j + 1]):
                break
            xs = block.result
            count += 1
    return count


def row_maps(chain: BlockChain, inputs: Sequence[torch.Tensor] | None = None) -> list[TileRows | None]:
    """Per block, its row geometry and tile cost for the planner while the leading blocks are
    tileable (None from the first block that is not): output row r reads rows
    ``lo[r]..hi[r]-1`` of the block's first input."""
    xs = tuple(inputs) if inputs is not None else _zeros(chain.boundaries[0])
    geometry: list[TileRows] = []
    ranges: list[TiledRange] = []
    acts: list[tuple[torch.Tensor, ...]] = []
    for j in range(tileable_prefix(chain)):
        tiled = TiledRange(chain, j, j, xs)
        rows = [tiled.input_rows((r, r + 1))[0] for r in range(tiled.height)]
        geometry.append(
            TileRows(
                in_height=chain.boundaries[j][0].shape[2],
                out_height=tiled.height,
                lo=tuple(a for a, _ in rows),
                hi=tuple(b for _, b in rows),
                codec_ns_per_byte=codec_ns_per_byte(xs),
            )
        )
        ranges.append(tiled)
        acts.append(xs)
        with torch.inference_mode():
            xs = tuple(chain.blocks[j].module(*xs))
    costs = _tile_costs(chain, ranges, acts)
    maps: list[TileRows | None] = [None] * len(chain)
    for j, (g, (fixed, overhead)) in enumerate(zip(geometry, costs, strict=True)):
        maps[j] = replace(g, fixed=fixed, overhead=overhead)
    return maps


def _band(height: int) -> Rows:
    """The middle quarter of ``height`` rows (at least one): a typical tile, halo on both sides."""
    size = max(1, round(height / 4))
    start = (height - size) // 2
    return (start, start + size)


def _tile_costs(
    chain: BlockChain,
    ranges: Sequence[TiledRange],
    acts: Sequence[tuple[torch.Tensor, ...]],
    repeats: int = 3,
) -> list[tuple[float, float]]:
    """Per tileable block, ``(TileRows.fixed, TileRows.overhead)`` on one thread: the block
    timed plainly, whole as a tile, and on a middle band of rows, then a line through the two
    tile times (``TileRows.work``). Why measured: a tile's cost is not proportional to its rows
    where the feature map is small (a one-row tile of a 7-row ResNet-50 block costs over half
    the block: every tile streams all its weights), and stitching resets the halo only at a
    price the planner must see. Each kind runs as a whole pass over the blocks, in order, as a
    request does: one block timed again and again would keep its weights in cache."""
    if not ranges:
        return []
    bands = [_band(r.height) for r in ranges]
    band_inputs = [r.scatter(x, b) for r, x, b in zip(ranges, acts, bands, strict=True)]
    passes: list[Callable[[int], object]] = [
        lambda j: chain.blocks[j].module(*acts[j]),
        lambda j: ranges[j].run(acts[j], (0, ranges[j].height)),
        lambda j: ranges[j].run(band_inputs[j], bands[j]),
    ]
    times: list[list[list[float]]] = [[[] for _ in ranges] for _ in passes]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for timed in [False] + [True] * repeats:
                for run, samples in zip(passes, times, strict=True):
                    for j in range(len(ranges)):
                        t0 = time.perf_counter()
                        run(j)
                        if timed:
                            samples[j].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    costs = []
    for j, tiled in enumerate(ranges):
        plain, whole, band = (statistics.median(t[j]) for t in times)
        lo, hi = tiled.input_rows(bands[j])[0]
        share = ((bands[j][1] - bands[j][0]) / tiled.height + (hi - lo) / acts[j][0].shape[2]) / 2
        costs.append(fit_tile_cost(whole / plain, band / plain, share))
    return costs


def fit_tile_cost(whole: float, band: float, share: float) -> tuple[float, float]:
    """``(TileRows.fixed, TileRows.overhead)`` from a block's time run whole as a tile and on a
    band of rows whose share (``TileRows.work``) is ``share``, both relative to its plain time:
    the line through the two points, the fixed part clamped to 0..1, the overhead to ≥ 0."""
    fixed = (band - whole * share) / (1.0 - share) if share < 1 else 0.0
    return min(max(fixed, 0.0), 1.0), max(whole - 1.0, 0.0)


def codec_ns_per_byte(inputs: Sequence[torch.Tensor], repeats: int = 5) -> float:
    """Nanoseconds per byte, on one thread, to move a stripe of ``inputs`` through a frame as a
    scatter or gather does: cut the rows out (a copy), encode, decode (the planner prices
    scatter and gather with it, ``planner.tiles``). The stripe is the top half of the rows."""
    half = tuple(t.narrow(2, 0, max(1, t.shape[2] // 2)) for t in inputs)
    nbytes = sum(t.numel() * t.element_size() for t in half)
    if nbytes == 0:
        return 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    samples = []
    try:
        for _ in range(repeats + 1):  # the first warms the allocator
            t0 = time.perf_counter_ns()
            codec.decode_all(codec.encode_all([t.contiguous() for t in half]))
            samples.append(time.perf_counter_ns() - t0)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(samples[1:]) / nbytes
