"""What the subcommands share: model options (run, plan, bench), planning and compression
options (run, plan), the CPU-limit option and the progress bar (run, bench)."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from amp4ec.compression import COMPRESSION_MODES, DEFAULT_MAX_ERROR, Compression
from amp4ec.errors import InvalidSpec
from amp4ec.nodes import DEFAULT_CFS_PERIOD, parse_cfs_period
from amp4ec.planner import OBJECTIVES, STRATEGIES

__all__ = [
    "OBJECTIVES",
    "STRATEGIES",
    "ZOO_NAMES",
    "batching_from",
    "batching_options",
    "cfs_period_option",
    "check_model_args",
    "compression_from",
    "compression_options",
    "cpu_limits_option",
    "examples",
    "factories_from_cwd",
    "model_options",
    "parse_shape",
    "planning_options",
    "progress_bar",
    "rate_from",
    "source_from",
]


def examples(*lines: str) -> str:
    """A ``--help`` epilog of example commands, shown as written (``\\b``: click does not rewrap)."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise InvalidSpec(f"--input-shape: expected sizes like 1,3,224,224, got {text!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise InvalidSpec(f"--input-shape: expected positive sizes like 1,3,224,224, got {text!r}")
    return shape


def model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option(
                "--model",
                "-m",
                default="mobilenet_v2",
                show_default=True,
                help="zoo name, path to a torch.export archive (.pt2), or package.module:factory",
            ),
            click.option(
                "--weights",
                type=click.Path(dir_okay=False),
                help="local state_dict file (loaded with weights_only=True); default: seeded random",
            ),
            click.option("--seed", type=int, default=0, show_default=True, help="seed of the random weights"),
            click.option("--input-shape", help="input shape, e.g. 1,3,224,224 (default: the model's)"),
        ]
    ):
        f = option(f)
    return f


ZOO_NAMES = ("mobilenet_v2", "resnet18", "resnet50", "vit_tiny", "vit_b_16")
"""``amp4ec.models.ZOO``'s names, repeated: the zoo imports torch (tests/cli checks the two agree)."""


def check_model_args(model: str, weights: str | None, input_shape: str | None) -> tuple[int, ...] | None:
    """What can be checked of the model flags without torch; returns the parsed input shape."""
    spec = model.strip()
    if spec.endswith(".pt2") and not Path(spec).is_file():
        raise InvalidSpec(f"--model: file {spec} does not exist; expected a torch.export .pt2 archive")
    if not spec.endswith(".pt2") and ":" not in spec and spec not in ZOO_NAMES:
        raise InvalidSpec(
            f"--model: unknown zoo name {spec!r}; expected one of {', '.join(ZOO_NAMES)} "
            "(amp4ec models), a .pt2 path or package.module:factory"
        )
    if ":" in spec and not spec.endswith(".pt2"):
        factories_from_cwd()
    if weights is not None and not Path(weights).is_file():
        raise InvalidSpec(f"--weights: file {weights} does not exist; expected a local state_dict file")
    return parse_shape(input_shape)


def factories_from_cwd() -> None:
    """Make ``--model mymodels:build`` work from the folder holding mymodels.py, as with
    ``python -m``: the console script's path starts at its own bin folder, not here. Appended,
    so a file here never shadows an installed package; the agents, started with ``python -m``
    in this folder, find it too."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def source_from(model: str, weights: str | None, seed: int, input_shape: str | None) -> Any:
    """The ``ModelSource`` of the model flags, checked first (torch loads only after the checks)."""
    shape = check_model_args(model, weights, input_shape)
    from amp4ec.slicing import ModelSource

    return ModelSource(model, weights=weights, seed=seed, input_shape=shape)


def planning_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--strategy``, ``--objective``, ``--rate`` and ``--tiles``, as ``amp4ec.planner.plan`` takes them."""
    f = click.option(
        "--tiles/--no-tiles",
        default=True,
        show_default=True,
        help="let the optimal strategy split a request's leading convolutions into row tiles over "
        "several nodes where it predicts them 10% better than layer-wise stages (--no-tiles: "
        "layer-wise only; see docs/benchmarks.md, tiles)",
    )(f)
    f = click.option(
        "--rate",
        type=float,
        default=None,
        help="with --objective p95: the arrival rate (requests/s) whose p95 latency the plan minimises",
    )(f)
    f = click.option("--objective", type=click.Choice(OBJECTIVES), default="throughput", show_default=True)(f)
    return click.option(
        "--strategy", "-s", type=click.Choice(STRATEGIES), default="optimal", show_default=True
    )(f)


def rate_from(objective: str, rate: float | None) -> float | None:
    """``--rate``, checked against ``--objective`` (one line naming the flag when they disagree)."""
    if objective == "p95" and rate is None:
        raise InvalidSpec("--rate: --objective p95 needs the arrival rate in requests/s, e.g. --rate 40")
    if objective != "p95" and rate is not None:
        raise InvalidSpec(f"--rate: only --objective p95 takes a rate, not --objective {objective}")
    if rate is not None and not 0 < rate < math.inf:
        raise InvalidSpec(f"--rate: expected a positive number of requests/s, got {rate:g}")
    return rate


def compression_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--compression`` and ``--max-output-error`` (see ``amp4ec.compression``)."""
    f = click.option(
        "--max-output-error",
        type=float,
        default=DEFAULT_MAX_ERROR,
        show_default=True,
        help="with --compression auto: bound on the relative L2 error of the final outputs "
        "(0 allows nothing lossy)",
    )(f)
    return click.option(
        "--compression",
        type=click.Choice(COMPRESSION_MODES),
        default="off",
        show_default=True,
        help="auto: compress activations per cut (fp16 or int8) where a link is slow enough to pay "
        "for it; off: every cut raw, outputs bit-exact",
    )(f)


def compression_from(mode: str, max_output_error: float) -> Compression:
    """The policy of the flags, refused naming the flag before torch loads."""
    try:
        return Compression(mode, max_output_error)
    except InvalidSpec as exc:
        raise InvalidSpec(f"--{exc}".replace("--max_output_error", "--max-output-error")) from None


def batching_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--batch`` and ``--batch-delay-ms``: dynamic batching in every stage."""
    f = click.option(
        "--batch-delay-ms",
        type=float,
        default=0.0,
        show_default=True,
        help="how long a batch's first request may wait for more (0: only requests already waiting)",
    )(f)
    return click.option(
        "--batch",
        type=int,
        default=1,
        show_default=True,
        help="dynamic batching: the most waiting requests a stage runs in one forward (1: none)",
    )(f)


def batching_from(batch: int, delay_ms: float) -> Any:
    """The ``Batching`` of the flags, checked (torch-free)."""
    from amp4ec.wire.stage import Batching

    return Batching(batch, delay_ms).checked()


LIMIT_MODES = ("auto", "cgroup", "emulate", "none")
"""``amp4ec.local.LIMIT_MODES``, repeated: importing ``amp4ec.local`` loads torch, too slow for
``--help`` (tests/cli checks the two agree)."""

cpu_limits_option = click.option(
    "--cpu-limits",
    type=click.Choice(LIMIT_MODES),
    default="auto",
    show_default=True,
    help="how node CPU shares are enforced (auto: cgroup when permitted)",
)


def _cfs_period(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return parse_cfs_period(value)
    except InvalidSpec as e:
        raise click.BadParameter(str(e).removeprefix("--cfs-period: ")) from None


cfs_period_option = click.option(
    "--cfs-period",
    default=DEFAULT_CFS_PERIOD,
    show_default=True,
    callback=_cfs_period,
    help="CFS period of the nodes' cgroup quotas: short (5 ms: a slow node is slow on every "
    "request), docker (100 ms, as Docker --cpus and the paper), or milliseconds",
)


def progress_bar(console: Console) -> Progress:
    """The bar long commands show while they work; it disappears when they are done."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
