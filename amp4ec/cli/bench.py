"""``amp4ec bench``: every configuration and strategy, measured in one run → JSON, PNGs, docs table."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import Progress, TaskID

from amp4ec.bench.names import CONFIGURATION_NAMES
from amp4ec.bench.progress import ProgressSink
from amp4ec.cli.checks import missing_extra
from amp4ec.cli.options import (
    cfs_period_option,
    cpu_limits_option,
    examples,
    model_options,
    progress_bar,
    source_from,
)
from amp4ec.errors import InvalidSpec

__all__ = ["bench"]

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"
"""The repository's benchmark page (``--update-docs``), found from the package, not the current folder."""


class _RichSink(ProgressSink):
    def __init__(self, bar: Progress, console: Console, total: int) -> None:
        self.bar, self.console = bar, console
        self.overall: TaskID = bar.add_task("[bold]benchmark", total=total)
        self.current: TaskID = bar.add_task("starting", total=None)

    def phase(self, text: str, total: int | None = None) -> None:
        self.bar.reset(self.current, total=total, description=text)

    def advance(self) -> None:
        self.bar.advance(self.current)

    def step(self) -> None:
        self.bar.advance(self.overall)

    def note(self, text: str) -> None:
        self.console.print(f"[yellow]note:[/] {text}", highlight=False)


@click.command(
    epilog=examples(
        "amp4ec bench --quick --out /tmp/bench   # one configuration, a few minutes",
        "amp4ec bench --update-docs             # everything; rewrites docs/benchmarks.md",
    )
)
@model_options
@click.option("--quick", is_flag=True, help="the reduced CI run: one configuration, few requests")
@click.option(
    "--only",
    multiple=True,
    type=click.Choice(CONFIGURATION_NAMES),
    help="run only this configuration (repeatable; default: all, or standard with --quick)",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("out/bench"),
    show_default=True,
    help="folder for results.json, benchmarks.md and the PNG plots (the only place written by default)",
)
@click.option(
    "--update-docs",
    is_flag=True,
    help=f"also rewrite the generated section of the repository's {DOCS.parent.name}/{DOCS.name}",
)
@click.option(
    "--docs",
    "docs_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="rewrite the generated section of this Markdown file instead (implies --update-docs)",
)
@click.option("--no-docs", is_flag=True, hidden=True, help="the default now; kept for old scripts")
@click.option("--no-plots", is_flag=True, help="skip the PNG plots (needed without matplotlib)")
@click.option(
    "--big-model", default="vit_b_16", show_default=True, help="zoo model of the big-model configuration"
)
@cpu_limits_option
@cfs_period_option
@click.option(
    "--insecure",
    is_flag=True,
    help="plaintext gRPC throughout (default: mutual TLS, compared with plaintext)",
)
def bench(
    model: str,
    weights: str | None,
    seed: int,
    input_shape: str | None,
    quick: bool,
    only: tuple[str, ...],
    out: Path,
    update_docs: bool,
    docs_path: Path | None,
    no_docs: bool,
    no_plots: bool,
    big_model: str,
    cpu_limits: str,
    cfs_period: int,
    insecure: bool,
) -> None:
    """Benchmark amp4ec against both monoliths and the baselines, as in the paper, on this machine."""
    docs = docs_path or (DOCS if update_docs and not no_docs else None)
    check_bench_args(out, docs, no_plots)
    # gRPC's fork notices (agents are forked while channels are open) would interleave the bar.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from amp4ec.bench.markdown import render, write_docs
    from amp4ec.bench.plots import write_plots
    from amp4ec.bench.report import write_json
    from amp4ec.bench.suite import BenchOptions, run_bench, total_steps

    options = BenchOptions(
        source=source_from(model, weights, seed, input_shape),
        quick=quick,
        only=only,
        big_model=big_model,
        limit_mode=cpu_limits,
        cfs_period_us=cfs_period,
        secure=not insecure,
        command=shlex.join(["amp4ec", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else "amp4ec bench",
    )
    console = Console()
    with progress_bar(console) as bar:
        results = asyncio.run(run_bench(options, _RichSink(bar, console, total_steps(options))))
    write_json(results, out / "results.json")
    plots = [] if no_plots else write_plots(results, out)
    markdown = render(results)
    (out / "benchmarks.md").write_text(markdown)
    console.print(markdown, markup=False, highlight=False)
    if docs is not None:
        write_docs(docs, markdown)
        console.print(f"table written into {docs}")
    shown = ", ".join(str(p) for p in plots) or "none (--no-plots)"
    console.print(f"results: {out / 'results.json'}; plots: {shown}")
    console.print(f"took {results.wall_s / 60:.1f} min")


def check_bench_args(out: Path, docs: Path | None, no_plots: bool) -> None:
    """What a bench run needs at its end, checked before its minutes of work."""
    if not no_plots and missing_extra("matplotlib"):
        raise InvalidSpec(
            "amp4ec bench draws its plots with matplotlib, which is not installed: "
            "pip install 'amp4ec[bench]' (or pass --no-plots)"
        )
    if out.exists() and not out.is_dir():
        raise InvalidSpec(f"--out: {out} is a file; expected a folder")
    if docs is not None and not docs.parent.is_dir():
        raise InvalidSpec(
            f"--docs: folder {docs.parent} does not exist (--update-docs needs a clone of amp4ec)"
        )
