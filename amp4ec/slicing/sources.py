"""Model sources: turn a spec (zoo name, .pt2 archive, ``package.module:factory``) into a module.

Every error names the field (``model``, ``weights``, ``input_shape``) and what was expected,
so the CLI and the node agent can show it as one line.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amp4ec.errors import InvalidSpec, ModelNotFound, ShapeMismatch
from amp4ec.slicing.archive import ensure_safe_archive
from amp4ec.slicing.materialise import load_state, supports_meta
from amp4ec.slicing.materialise import materialise as materialise_tensors
from amp4ec.slicing.pt2_lazy import ArchiveWeights, load_meta_program
from amp4ec.wire.stage import StageConfig

__all__ = ["LoadedModel", "ModelSource", "ensure_factory_allowed", "factory_module", "load_model"]

_SPEC_FORMS = "a zoo name, a path ending in .pt2 or package.module:factory"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from and how to make its weights and example input reproducible."""

    spec: str
    """Zoo name | path ending in ``.pt2`` (torch.export archive) | ``package.module:factory``."""
    weights: str | None = None
    """A local state_dict file (``torch.load(..., weights_only=True)``); None keeps the seeded init."""
    seed: int = 0
    """Seeds the random init and the example input, so every process builds identical weights."""
    input_shape: tuple[int, ...] | None = None
    """Overrides the default input shape; required for factories that declare none."""

    def stage(self, first_block: int, last_block: int, **routing: Any) -> StageConfig:
        """The stage serving blocks ``first_block..last_block`` of this model; ``routing``: the
        other ``StageConfig`` fields (stage index, next hop, identities)."""
        return StageConfig(
            model=self.spec,
            weights=self.weights,
            seed=self.seed,
            input_shape=self.input_shape,
            first_block=first_block,
            last_block=last_block,
            **routing,
        )


@dataclass
class LoadedModel:
    """A model ready to split: eval mode, plus the example input that fixes every boundary shape."""

    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    name: str
    lazy: bool = False
    """True when the module's tensors are still on the meta device (``load_model(...,
    materialise=False)`` of a zoo model): split it, then ``materialise`` only the shard kept."""
    state: Mapping[str, torch.Tensor] | None = None
    """The memory-mapped weights file of a lazy model (None: seeded weights)."""


def load_model(source: ModelSource, *, materialise: bool = True) -> LoadedModel:
    """Build (or load) the model, apply weights, and make deterministic example inputs.

    A zoo model is built on the meta device and its tensors made from (seed, name) (see
    ``amp4ec.slicing.materialise``); ``materialise=False`` leaves them on the meta device so
    that a caller keeping one shard never holds the whole model.
    """
    spec = source.spec.strip()
    if not spec:
        raise InvalidSpec(f"model: expected {_SPEC_FORMS}, got ''")
    override = _check_shape(source.input_shape) if source.input_shape is not None else None

    archive = spec.endswith(".pt2")
    lazy, state = False, None
    if archive:
        # Not materialised: weights stay on the meta device, read per shard (pt2_lazy.py).
        module, shapes, dtypes, state = _load_archive(spec, override, lazy=not materialise)
        lazy = state is not None
        name = Path(spec).stem
    else:
        factory, name, default_shape = _resolve_factory(spec)
        module, lazy = _build(factory, source.seed, name, meta=_is_zoo(spec))
        shape = override or _declared_shape(module, factory, default_shape)
        if shape is None:
            raise InvalidSpec(
                f"input_shape: factory {name} declares no input shape; give --input-shape, e.g. "
                "1,3,224,224, or set input_shape on the factory or the module it returns"
            )
        shapes, dtypes = [shape], [torch.float32]

    if lazy and not archive:
        state = load_state(source.weights, module.state_dict(), name) if source.weights else None
        if materialise:
            materialise_tensors([module], source.seed, state)
            lazy, state = False, None
    elif source.weights and not lazy:
        _apply_weights(module, source.weights, name)
    if not archive:
        module.eval()  # an ExportedProgram's module refuses .eval(); it runs as it was exported
    gen = torch.Generator().manual_seed(source.seed)
    inputs = tuple(_example(s, d, gen) for s, d in zip(shapes, dtypes, strict=True))
    return LoadedModel(module=module, example_inputs=inputs, name=name, lazy=lazy, state=state)


def factory_module(spec: str) -> str | None:
    """The module a ``package.module:factory`` spec imports; None for zoo names and archives."""
    spec = spec.strip()
    if spec.endswith(".pt2") or ":" not in spec or _is_zoo(spec):
        return None
    return spec.partition(":")[0]


def ensure_factory_allowed(spec: str, allowed: Collection[str], field: str = "model") -> None:
    """Refuse a factory spec unless its module (or a package above it) is in ``allowed``.

    Importing a module runs its code (``os:abort`` kills the process), so a spec that
    arrives over the network may name only modules whoever started the process allowed.
    """
    module = factory_module(spec)
    if module is None:
        return
    if any(module == a or module.startswith(a + ".") for a in allowed):
        return
    shown = ", ".join(sorted(allowed)) or "none"
    raise InvalidSpec(
        f"{field}: factory module {module!r} is not allowed here (a factory runs code; allowed: {shown}); "
        "expected a zoo name, a .pt2 archive or a factory of an allowed module"
    )


def _is_zoo(spec: str) -> bool:
    from amp4ec.models import ZOO

    return spec in ZOO


def _resolve_factory(spec: str) -> tuple[Callable[..., Any], str, tuple[int, ...] | None]:
    """A zoo entry or ``package.module:factory`` → (factory, name, default input shape)."""
    from amp4ec.models import ZOO  # local: the zoo's torch modules load only when needed

    if spec in ZOO:
        entry = ZOO[spec]
        return entry.factory, spec, entry.input_shape
    if ":" not in spec:
        known = ", ".join(sorted(ZOO))
        raise ModelNotFound(
            f"model: unknown zoo name {spec!r}; expected one of {known}, a .pt2 path or module:factory"
        )
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelNotFound(f"model: expected package.module:factory, got {spec!r}")
    try:
        mod = importlib.import_module(module_name)
    except Exception as e:  # ImportError, but also a user module that fails while importing
        raise ModelNotFound(
            f"model: cannot import module {module_name!r} ({type(e).__name__}: {_first_line(e)})"
        ) from e
    factory = mod
    for part in attr.split("."):  # allows module:Class.builder
        if not hasattr(factory, part):
            raise ModelNotFound(f"model: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ModelNotFound(f"model: {spec!r} is not callable; expected a factory returning an nn.Module")
    return factory, spec, None


def _build(factory: Callable[..., Any], seed: int, name: str, meta: bool = False) -> tuple[nn.Module, bool]:
    """(module, on the meta device?). ``meta`` is honoured only when every buffer's value is
    known without running the factory for real (``supports_meta``); else it is built again."""
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            with torch.device("meta") if meta else contextlib.nullcontext():
                module = factory()
            if meta and isinstance(module, nn.Module) and not supports_meta(module):
                torch.manual_seed(seed)
                module, meta = factory(), False
        except Exception as e:
            raise InvalidSpec(f"model: factory {name}() failed ({type(e).__name__}: {_first_line(e)})") from e
    if not isinstance(module, nn.Module):
        raise InvalidSpec(f"model: factory {name}() returned {type(module).__name__}, expected an nn.Module")
    return module, meta


def _declared_shape(
    module: nn.Module, factory: Callable[..., Any], default: tuple[int, ...] | None
) -> tuple[int, ...] | None:
    declared = getattr(module, "input_shape", None) or getattr(factory, "input_shape", None) or default
    return _check_shape(declared) if declared is not None else None


def _check_shape(shape: Any) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise InvalidSpec(f"input_shape: expected positive integers like (1, 3, 224, 224), got {shape!r}")
    return dims


def _load_archive(
    path: str, override: tuple[int, ...] | None, lazy: bool = False
) -> tuple[nn.Module, list[tuple[int, ...]], list[torch.dtype], ArchiveWeights | None]:
    """A torch.export archive → its module plus the input shapes/dtypes it was exported with;
    ``lazy``: its weights on the meta device, with the reader of each by name (else None)."""
    if not Path(path).is_file():
        raise ModelNotFound(f"model: file {path} does not exist; expected a torch.export .pt2 archive")
    weights = None
    try:
        # One open file for the check and the load: replacing the path in between changes nothing.
        file = open(path, "rb")  # noqa: SIM115 - kept open by a lazy archive's weights
        try:
            ensure_safe_archive(file, name=path)  # see [Note: archive allow-list]
            file.seek(0)
            if lazy:
                program, weights = load_meta_program(file)
            else:
                program = torch.export.load(file)
        finally:
            if weights is None:
                file.close()
    except InvalidSpec:
        raise
    except Exception as e:
        raise InvalidSpec(
            f"model: cannot load {path} as a torch.export archive ({type(e).__name__}: {_first_line(e)})"
        ) from e
    user_inputs = set(program.graph_signature.user_inputs)
    vals = [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    if not vals or not all(isinstance(v, torch.Tensor) for v in vals):
        raise InvalidSpec(f"model: {path} must take only tensor inputs")
    shapes = [_static_shape(v.shape) for v in vals]
    if override is not None:
        if len(shapes) != 1:
            raise InvalidSpec(f"input_shape: {path} takes {len(shapes)} inputs; expected no input_shape")
        shapes = [_fit_override(shapes[0], override, path)]
    return program.module(), [_materialise(s) for s in shapes], [v.dtype for v in vals], weights


def _static_shape(shape: Sequence[Any]) -> tuple[int | None, ...]:
    """Exported dims: an int when static, None when symbolic (exported with dynamic shapes)."""
    out: list[int | None] = []
    for d in shape:
        try:
            out.append(int(d) if not isinstance(d, torch.SymInt) else None)
        except (TypeError, ValueError):
            out.append(None)
    return tuple(out)


def _fit_override(exported: tuple[int | None, ...], wanted: tuple[int, ...], path: str) -> tuple[int, ...]:
    ok = len(exported) == len(wanted) and all(e in (None, w) for e, w in zip(exported, wanted, strict=True))
    if not ok:
        shown = ", ".join("*" if e is None else str(e) for e in exported)
        raise ShapeMismatch(
            f"input_shape: {path} was exported for [{shown}]; expected a shape matching it, "
            f"actual {list(wanted)}"
        )
    return wanted


def _materialise(shape: tuple[int | None, ...]) -> tuple[int, ...]:
    # A dynamic dim without an override: 1 for the batch (dim 0), else unknown → refuse.
    if any(d is None for d in shape[1:]):
        raise InvalidSpec("input_shape: the archive has dynamic non-batch dims; give --input-shape")
    return tuple(1 if d is None else d for d in shape)


def _example(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    return torch.randint(0, 10, shape, generator=gen, dtype=dtype)  # e.g. token ids


def _apply_weights(module: nn.Module, path: str, name: str) -> None:
    state = load_state(path, module.state_dict(), name)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:  # same keys, different shapes
        first = str(e).strip().splitlines()[-1].strip()
        raise InvalidSpec(f"weights: {path} does not fit model {name}: {first}") from e


def _first_line(e: BaseException) -> str:
    """An exception as one line: errors here end up as a single line in the CLI."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
