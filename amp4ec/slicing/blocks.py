"""Block chains: any traceable model cut into an ordered chain of blocks at valid cut points.

How a model becomes a chain:

1. Trace it to an FX graph (``torch.fx.symbolic_trace``; an exported program's module is
   already one) and run the graph once on the example inputs, recording what each node makes.
2. Group the compute nodes into *runs* by ``nn_module_stack``. A node's key is the child of
   the outermost container on its stack (``features.3``, ``layer2.0``), else its top-level
   module (``conv1``). Containers: exact ``nn.Sequential``/``ModuleList``/``ModuleDict`` and
   paths never called themselves (a ModuleList iterated in Python). Modules above an outermost
   container (ViT's ``encoder`` above ``encoder.layers``) are looked through: their other
   children are blocks too (``encoder.ln``). Nodes with no key (root ops such as pooling and
   flatten, ops written in a looked-through module's forward) are glue and join the run
   before them. Consecutive nodes with the same key form a run.
3. The cut between two runs carries every value defined before it and used after it. A cut is
   valid only when all of those are tensors; runs across an invalid cut merge into one block.
4. Each block becomes its own ``fx.GraphModule``: inputs = the cut before it, outputs = the cut
   after it (values used further down are forwarded), holding only the parameters it uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from amp4ec.errors import InvalidSpec, ShapeMismatch
from amp4ec.slicing.sources import LoadedModel, _first_line

__all__ = ["Block", "BlockChain", "Shard", "TensorSpec", "split_model"]

_CONTAINERS = frozenset(f"torch.nn.modules.container.{c}" for c in ("Sequential", "ModuleList", "ModuleDict"))
_COMPUTE = ("call_function", "call_method", "call_module")


@dataclass(frozen=True)
class TensorSpec:
    """The dtype and shape of one tensor crossing a cut (batch dimension included)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorSpec:
        return cls(tuple(t.shape), t.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __str__(self) -> str:
        return _fmt(self.dtype, self.shape)


@dataclass(frozen=True)
class Block:
    """One link of the chain: ``module(*cut[index]) -> cut[index + 1]`` (always a tuple)."""

    index: int
    name: str
    module: fx.GraphModule


class Shard(nn.Module):
    """Blocks ``first..last`` (inclusive) run in order; holds only those blocks' parameters."""

    def __init__(
        self,
        blocks: Sequence[Block],
        input_specs: tuple[TensorSpec, ...],
        output_specs: tuple[TensorSpec, ...],
        batch_flexible: bool = False,
    ) -> None:
        super().__init__()
        self.first = blocks[0].index
        self.last = blocks[-1].index
        self.names = tuple(b.name for b in blocks)
        self.input_specs = input_specs
        self.output_specs = output_specs
        self.batch_flexible = batch_flexible
        """True when dim 0 of every cut tensor is the batch, so any batch size is accepted."""
        self.blocks = nn.ModuleList(b.module for b in blocks)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out: tuple[torch.Tensor, ...] = tensors
        for block in self.blocks:
            out = block(*out)
        return tuple(out)

    def check_inputs(self, tensors: Sequence[Any]) -> None:
        """Raise ShapeMismatch unless ``tensors`` match ``input_specs`` (count, dtype, shape).

        Shapes are compared exactly, batch included, unless the chain proved batch-generic
        (``batch_flexible``): then dim 0 may be any size shared by all inputs.
        """
        where = f"shard {self.first}..{self.last}"
        if len(tensors) != len(self.input_specs):
            raise ShapeMismatch(
                f"{where}: expected {len(self.input_specs)} input tensor(s), actual {len(tensors)}"
            )
        batch: int | None = None
        for i, (t, spec) in enumerate(zip(tensors, self.input_specs, strict=True)):
            expected = self._expected(spec)
            if not isinstance(t, torch.Tensor):
                raise ShapeMismatch(f"input {i} of {where}: expected {expected}, actual {type(t).__name__}")
            shape = tuple(t.shape)
            if self.batch_flexible and len(shape) == len(spec.shape) and shape:
                same = shape[1:] == spec.shape[1:] and (batch is None or shape[0] == batch)
                batch = shape[0]
            else:
                same = shape == spec.shape
            if not same or t.dtype != spec.dtype:
                raise ShapeMismatch(
                    f"input {i} of {where}: expected {expected}, actual {_fmt(t.dtype, shape)}"
                )

    def _expected(self, spec: TensorSpec) -> str:
        flexible = self.batch_flexible and spec.shape
        return _fmt(spec.dtype, ("N", *spec.shape[1:])) if flexible else str(spec)

    @property
    def param_bytes(self) -> int:
        """Bytes of the parameters and buffers this shard holds (shared tensors counted once)."""
        return _param_bytes(self)


class BlockChain:
    """A model as an ordered chain of blocks and the tensor specs at each of its cuts."""

    def __init__(
        self,
        name: str,
        blocks: list[Block],
        boundaries: list[tuple[TensorSpec, ...]],
        example_inputs: tuple[torch.Tensor, ...],
        batch_flexible: bool,
    ) -> None:
        self.name = name
        self.blocks = blocks
        self.boundaries = boundaries
        """``len(blocks) + 1`` cuts: ``boundaries[0]`` = model inputs, ``boundaries[-1]`` = outputs."""
        self.example_inputs = example_inputs
        self.batch_flexible = batch_flexible

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    @property
    def input_bytes(self) -> int:
        """Bytes of the model inputs at the example batch (what a client sends per request)."""
        return sum(spec.nbytes for spec in self.boundaries[0])

    def shard(self, first: int, last: int) -> Shard:
        """Blocks ``first..last`` inclusive as one module sharing this chain's parameters."""
        n = len(self.blocks)
        if not (0 <= first <= last < n):
            raise InvalidSpec(
                f"blocks: expected 0 <= first <= last <= {n - 1}, got first={first}, last={last}"
            )
        return Shard(
            self.blocks[first : last + 1],
            self.boundaries[first],
            self.boundaries[last + 1],
            self.batch_flexible,
        )

    def __repr__(self) -> str:
        return f"BlockChain({self.name!r}, {len(self)} blocks: {', '.join(self.names)})"


def split_model(
    model: LoadedModel | nn.Module,
    example_inputs: Sequence[torch.Tensor] | None = None,
    *,
    check_batch: bool = True,
) -> BlockChain:
    """Cut ``model`` into its chain of blocks.

    ``check_batch`` runs the graph once more at twice the batch: if every cut scales in dim 0
    only, shards accept any batch size (``batch_flexible``); otherwise shapes are exact.
    """
    if isinstance(model, LoadedModel):
        module, inputs, name = model.module, model.example_inputs, model.name
    else:
        if example_inputs is None:
            raise InvalidSpec("example_inputs: expected tensors when splitting a bare nn.Module")
        module, inputs, name = model, tuple(example_inputs), type(model).__name__
    gm = _trace(module, inputs, name)
    try:
        specs = _record(gm, inputs)
    except Exception as e:
        shown = ", ".join(str(TensorSpec.of(t)) for t in inputs)
        raise ShapeMismatch(
            f"input_shape: model {name} does not run on {shown} ({type(e).__name__}: {_first_line(e)})"
        ) from e

    graph_order = {n: i for i, n in enumerate(gm.graph.nodes)}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    outputs = _output_leaves(gm, name)
    if any(specs.get(v) is None for v in outputs):
        raise InvalidSpec(f"model: {name} must return only tensors")
    runs = _runs([n for n in gm.graph.nodes if n.op in _COMPUTE and not _is_guard(n)]) or [("model", [])]

    # Which run defines each value and the last run that reads it (the output reads after all).
    defined = {p: -1 for p in placeholders}
    last_use: dict[fx.Node, int] = {}
    for i, (_, nodes) in enumerate(runs):
        for n in nodes:
            defined[n] = i
            for a in n.all_input_nodes:
                last_use[a] = max(last_use.get(a, -1), i)
    for v in outputs:
        last_use[v] = len(runs)

    def crossing(k: int) -> list[fx.Node]:
        live = [v for v, d in defined.items() if d < k <= last_use.get(v, -1)]
        return sorted(live, key=graph_order.__getitem__)

    cuts = [0]
    cut_values: list[list[fx.Node]] = [placeholders]
    for k in range(1, len(runs)):
        live = crossing(k)
        if live and all(specs.get(v) is not None for v in live):
            cuts.append(k)
            cut_values.append(live)
    cuts.append(len(runs))
    cut_values.append(outputs)

    blocks: list[Block] = []
    seen: dict[str, int] = {}
    for b in range(len(cuts) - 1):
        group = runs[cuts[b] : cuts[b + 1]]
        nodes = [n for _, ns in group for n in ns]
        block_name = _block_name([key for key, _ in group], seen)
        module_b = _build_block(gm, nodes, cut_values[b], cut_values[b + 1])
        blocks.append(Block(b, block_name, module_b))
    boundaries = [tuple(specs[v] for v in vals) for vals in cut_values]
    flexible = check_batch and _batch_generic(gm, inputs, specs, [v for vs in cut_values for v in vs])
    return BlockChain(name, blocks, boundaries, tuple(inputs), flexible)


def _trace(module: nn.Module, inputs: tuple[torch.Tensor, ...], name: str) -> fx.GraphModule:
    """An FX graph of the model; torch.export as a fallback for what symbolic tracing cannot do."""
    if isinstance(module, fx.GraphModule):  # e.g. ExportedProgram.module(): aten-level already
        return module
    try:
        return fx.symbolic_trace(module)
    except Exception as fx_error:
        # Data-dependent Python control flow defeats symbolic tracing; export specialises it
        # to the example input instead (its shapes are then fixed, batch included).
        try:
            return torch.export.export(module, inputs).module()
        except Exception as export_error:
            raise InvalidSpec(
                f"model: cannot trace {name} with torch.fx ({_first_line(fx_error)}) "
                f"nor torch.export ({_first_line(export_error)})"
            ) from export_error


class _Recorder(fx.Interpreter):
    """Runs the graph once, keeping a TensorSpec per node (None for non-tensor values)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.specs: dict[fx.Node, TensorSpec | None] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.specs[n] = TensorSpec.of(out) if isinstance(out, torch.Tensor) else None
        return out


def _record(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> dict[fx.Node, TensorSpec | None]:
    recorder = _Recorder(gm)
    with torch.inference_mode():
        # Clones: a model starting with an in-place op must not alter the caller's inputs.
        recorder.run(*(t.clone() for t in inputs))
    return recorder.specs


def _batch_generic(
    gm: fx.GraphModule,
    inputs: Sequence[torch.Tensor],
    specs: dict[fx.Node, TensorSpec | None],
    cut_nodes: list[fx.Node],
) -> bool:
    """True when doubling the batch doubles dim 0 of every cut tensor and changes nothing else."""
    batch = inputs[0].shape[0] if inputs and inputs[0].dim() else None
    if batch is None or any(t.dim() == 0 or t.shape[0] != batch for t in inputs):
        return False
    try:
        doubled = _record(gm, [torch.cat([t, t]) for t in inputs])
    except Exception:  # hard-coded sizes (reshape(1, …), export guards) → exact shapes only
        return False
    for v in cut_nodes:
        one, two = specs[v], doubled.get(v)
        if one is None or two is None or not one.shape or len(one.shape) != len(two.shape):
            return False
        if one.shape[0] != batch or two.shape[0] != 2 * batch or one.shape[1:] != two.shape[1:]:
            return False
    return True


def _is_guard(n: fx.Node) -> bool:
    # ExportedProgram.module() checks its input shapes in a `_guards_fn` submodule call whose
    # result is unused; it belongs to no block (Shard.check_inputs does that job per shard).
    return n.op == "call_module" and str(n.target).startswith("_guards_fn")


def _output_leaves(gm: fx.GraphModule, name: str) -> list[fx.Node]:
    """The model's outputs flattened to a list of nodes (a dict/tuple output becomes a tuple)."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    leaves = pytree.tree_leaves(out.args[0])
    if not leaves or not all(isinstance(v, fx.Node) for v in leaves):
        raise InvalidSpec(f"model: {name} must return tensors, got {out.args[0]!r}")
    return leaves


def _module_stack(n: fx.Node) -> list[tuple[str, str]]:
    """(path, qualified type) outermost first, for both stack formats.

    symbolic_trace stores ``{path: (path, class)}``; torch.export stores
    ``{"L__self__…": (path, "module.Class")}`` and lists the root itself with path ``""``.
    """
    stack = n.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path, ty = value[0], value[1]
        if path:
            out.append((path, ty if isinstance(ty, str) else f"{ty.__module__}.{ty.__qualname__}"))
    return out


def _levels(n: fx.Node) -> list[tuple[str, bool]]:
    """The node's module paths outermost first, each flagged when it is a container.

    Containers: exact Sequential/ModuleList/ModuleDict, and any path prefix that is never
    called itself (a ModuleList iterated in Python, a plain holder module).
    """
    levels: list[tuple[str, bool]] = []
    prev = ""
    for path, ty in _module_stack(n):
        if not prev or path.startswith(prev + "."):
            parts = path.split(".")
            start = len(prev.split(".")) if prev else 0
            levels.extend((".".join(parts[:i]), True) for i in range(start + 1, len(parts)))
        levels.append((path, ty in _CONTAINERS))
        prev = path
    return levels


def _group_keys(nodes: list[fx.Node]) -> list[str | None]:
    """Each node's block key, or None for glue that joins the run before it (docstring, step 2).

    ``above``: modules on the path to an outermost container, e.g. ViT's ``encoder``. Their
    other children become blocks (``encoder.ln``); ops written directly in their forward
    (the position-embedding add) are glue, like root ops.
    """
    levels = [_levels(n) for n in nodes]
    above: set[str] = set()
    for lv in levels:
        first = next((i for i, (_, container) in enumerate(lv) if container), 0)
        above.update(path for path, _ in lv[:first])
    keys: list[str | None] = []
    for lv in levels:
        # The first level not above a container; when it is a container, its child.
        i = next((i for i, (path, _) in enumerate(lv) if path not in above), None)
        if i is not None and lv[i][1] and i + 1 < len(lv):
            i += 1
        keys.append(None if i is None else lv[i][0])
    return keys


def _runs(nodes: list[fx.Node]) -> list[tuple[str, list[fx.Node]]]:
    """Consecutive nodes sharing a key; glue nodes join the run before (or the first one)."""
    keys = _group_keys(nodes)
    first = next((k for k in keys if k is not None), "model")
    runs: list[tuple[str, list[fx.Node]]] = []
    current = first
    for n, key in zip(nodes, keys, strict=True):
        key = key if key is not None else current
        if runs and runs[-1][0] == key:
            runs[-1][1].append(n)
        else:
            runs.append((key, [n]))
        current = key
    return runs


def _block_name(keys: list[str], seen: dict[str, int]) -> str:
    """The block's module path; merged runs join their keys; a repeated path gets ``#2``, …."""
    unique = list(dict.fromkeys(keys))
    name = "+".join(unique) if len(unique) <= 3 else f"{unique[0]}+…+{unique[-1]}"
    seen[name] = seen.get(name, 0) + 1
    return name if seen[name] == 1 else f"{name}#{seen[name]}"


def _build_block(
    gm: fx.GraphModule, nodes: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node]
) -> fx.GraphModule:
    """A fresh graph: placeholders for ``inputs``, copies of ``nodes``, a tuple of ``outputs``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for v in inputs:
        env[v] = graph.placeholder(v.name)

    def lookup(v: fx.Node) -> fx.Node:
        if v not in env:
            if v.op != "get_attr":
                raise AssertionError(f"value {v.name} used by a block but not on its input cut")
            env[v] = graph.node_copy(v)  # parameters/constants are copied into every user block
        return env[v]

    for n in nodes:
        env[n] = graph.node_copy(n, lookup)
    graph.output(tuple(lookup(v) for v in outputs))
    graph.lint()
    # GraphModule(root, graph) copies only the submodules and attributes the graph references,
    # so a block (and a shard) keeps alive exactly the parameters it uses.
    return fx.GraphModule(gm, graph, class_name="Block")


def _param_bytes(module: nn.Module) -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _fmt(dtype: torch.dtype, shape: Sequence[int | str]) -> str:
    return f"{str(dtype).removeprefix('torch.')}[{', '.join(str(d) for d in shape)}]"
