"""PNG plots (matplotlib, Agg): latency distributions, throughput per strategy, fraction of the ideal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from amp4ec.bench.results import BenchResults, LatencyResult, MeasuredPlan, MultiTenantResult, StandardResult

__all__ = ["PLOTS", "write_plots"]

PLOTS = ("latency.png", "throughput.png", "ideal.png")


def write_plots(results: BenchResults, out: Path) -> list[Path]:
    """One figure per plot, one panel per measured configuration; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [
        c for c in results.configurations if isinstance(c, StandardResult | MultiTenantResult | LatencyResult)
    ]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw, ylabel in (
        (PLOTS[0], _latency, "open-loop latency, ms (log)"),
        (PLOTS[1], _throughput, "saturation throughput, req/s"),
        (PLOTS[2], _ideal, "fraction of the ideal"),
    ):
        fig, axes = plt.subplots(
            1, max(1, len(configs)), figsize=(4.8 * max(1, len(configs)), 4.2), squeeze=False
        )
        for ax, config in zip(axes[0], configs, strict=False):
            draw(ax, config)
            ax.set_title(config.name, fontsize=10)
            ax.set_ylabel(ylabel)
            ax.tick_params(axis="x", labelrotation=60, labelsize=8)
        if not configs:
            axes[0][0].text(0.5, 0.5, "no configuration measured", ha="center")
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


Plotted = StandardResult | MultiTenantResult | LatencyResult


def _strategies(config: Plotted) -> dict[str, MeasuredPlan]:
    """The measured strategies (none in a multi-tenant or latency configuration: empty panels)."""
    return config.ok_strategies() if isinstance(config, StandardResult) else {}


def _latency(ax: Any, config: Plotted) -> None:
    ok = _strategies(config)
    data = [(k, v.open_loop.latencies_ms) for k, v in ok.items() if v.open_loop.latencies_ms]
    if data:
        ax.boxplot([d for _, d in data], showfliers=True)
        ax.set_xticks(range(1, len(data) + 1), [k for k, _ in data])
        ax.set_yscale("log")


def _throughput(ax: Any, config: Plotted) -> None:
    ok = _strategies(config)
    ax.bar(list(ok), [v.saturation.rps for v in ok.values()], color="tab:blue")
    ideal = (
        config.ideal.rps if isinstance(config, StandardResult | MultiTenantResult) and config.ideal else None
    )
    if ideal:
        ax.axhline(ideal, color="tab:red", linestyle="--", label=f"ideal {ideal:.1f}")
        ax.legend(fontsize=8)


def _ideal(ax: Any, config: Plotted) -> None:
    ok = _strategies(config)
    ax.bar(list(ok), [v.fraction_of_ideal or 0.0 for v in ok.values()], color="tab:green")
    ax.axhline(1.0, color="tab:red", linestyle="--")
    ax.set_ylim(0, 1.2)
