#!/usr/bin/env python3
"""Planner speed benchmark (not a test): median/p95 planning time per strategy.

(a) a MobileNetV2-like profile (22 blocks at 224×224, or LayerProfiles from a JSON file)
    on three nodes of 1.0/0.6/0.4 CPU (1 GB/512 MB/512 MB), every strategy;
(b) 200 random blocks on 32 nodes, the default strategy;
(c) 25 random blocks on 8 nodes (the largest exact search), the default strategy, each
objective (p95 at 90% of the throughput plan's rate).

Targets: (a) median < 1 ms, (b) median < 100 ms, (c) well under a second.

    .venv/bin/python hack/bench_planner.py [--profile blocks.json] [--runs 300] [--json out.json]

The JSON profile is a list of objects with LayerProfile's fields (name, flops,
param_bytes, out_bytes, compute_ms, act_bytes).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amp4ec.planner import STRATEGIES, LayerProfile, NodeCapacity, plan

MB = 1_000_000
# MobileNetV2 inverted-residual settings: expansion t, channels c, repeats n, stride s.
SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
MACS_PER_MS = 1.5e6
"""Reference core: ~1.5 GMAC/s, so the whole net (~300 M MACs) takes ~0.2 s, close to the
paper's 235 ms for a 1.0-CPU container."""


def _block(name: str, macs: float, params: int, in_el: int, mid_el: int, out_el: int) -> LayerProfile:
    act = 4 * (in_el + mid_el + out_el)
    return LayerProfile(
        name=name,
        flops=int(2 * macs),
        param_bytes=4 * params,
        out_bytes=4 * out_el,
        compute_ms=macs / MACS_PER_MS + act / 2e9 * 1000,
        act_bytes=act,
    )


def mobilenet_v2() -> list[LayerProfile]:
    """22 blocks: features.0..18, avgpool, flatten, classifier (fp32, batch 1, 224×224)."""
    blocks, h, c = [], 112, 32
    blocks.append(_block("features.0", 112 * 112 * 32 * 27, 27 * 32 + 64, 3 * 224 * 224, 0, 32 * h * h))
    i = 1
    for t, cout, n, s in SETTINGS:
        for r in range(n):
            stride = s if r == 0 else 1
            ho = h // stride
            hid = c * t
            expand = h * h * c * hid if t != 1 else 0
            macs = expand + ho * ho * hid * 9 + ho * ho * hid * cout
            params = (c * hid if t != 1 else 0) + 9 * hid + hid * cout + 4 * hid + 2 * cout
            blocks.append(_block(f"features.{i}", macs, params, c * h * h, hid * h * h, cout * ho * ho))
            h, c, i = ho, cout, i + 1
    blocks.append(_block("features.18", h * h * c * 1280, c * 1280 + 2560, c * h * h, 0, 1280 * h * h))
    blocks.append(_block("avgpool", 1280 * h * h, 0, 1280 * h * h, 0, 1280))
    blocks.append(_block("flatten", 0, 0, 1280, 0, 1280))
    blocks.append(_block("classifier", 1280 * 1000, 1280 * 1000 + 1000, 1280, 0, 1000))
    return blocks


def paper_nodes() -> list[NodeCapacity]:
    return [
        NodeCapacity("high", 1.0, 1000 * MB),
        NodeCapacity("medium", 0.6, 512 * MB),
        NodeCapacity("low", 0.4, 512 * MB),
    ]


def random_instance(
    n_blocks: int, n_nodes: int, seed: int = 0
) -> tuple[list[LayerProfile], list[NodeCapacity]]:
    rng = random.Random(seed)
    blocks = [
        LayerProfile(
            f"b{i}",
            rng.randint(10**6, 10**9),
            rng.randint(10**4, 5 * MB),
            rng.randint(10**4, 4 * MB),
            rng.uniform(0.1, 20.0),
            rng.randint(10**4, 8 * MB),
        )
        for i in range(n_blocks)
    ]
    total = sum(b.param_bytes for b in blocks)
    nodes = [
        NodeCapacity(f"n{i}", rng.choice([0.25, 0.5, 1.0, 2.0]), int(total * rng.uniform(0.05, 0.6)))
        for i in range(n_nodes)
    ]
    return blocks, nodes


def _profile_blocks(data: list | dict) -> list[dict]:
    """A list of LayerProfile dicts, or the JSON `amp4ec plan --json` writes (its "blocks")."""
    return data["blocks"] if isinstance(data, dict) else data


def timed(fn, runs: int) -> dict[str, float]:
    fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return {
        "median_ms": statistics.median(samples),
        "p95_ms": samples[min(len(samples) - 1, int(0.95 * len(samples)))],
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--profile", type=Path, help="JSON list of LayerProfile fields (default: MobileNetV2-like)"
    )
    ap.add_argument("--runs", type=int, default=300, help="runs per case (a); (b) uses runs/10, at least 10")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    blocks = (
        [LayerProfile(**b) for b in _profile_blocks(json.loads(args.profile.read_text()))]
        if args.profile
        else mobilenet_v2()
    )
    nodes = paper_nodes()
    rows = []
    for strategy in STRATEGIES:
        result = plan(blocks, nodes, strategy=strategy)
        stats = timed(lambda s=strategy: plan(blocks, nodes, strategy=s), args.runs)
        rows.append(
            {
                "case": f"a: {len(blocks)} blocks x 3 nodes",
                "strategy": strategy,
                **stats,
                "target_ms": 1.0,
                "predicted_rps": result.predicted.throughput_rps,
                "predicted_latency_ms": result.predicted.latency_ms,
            }
        )
    big_blocks, big_nodes = random_instance(200, 32)
    result = plan(big_blocks, big_nodes)
    stats = timed(lambda: plan(big_blocks, big_nodes), max(10, args.runs // 10))
    rows.append(
        {
            "case": "b: 200 blocks x 32 nodes",
            "strategy": "optimal",
            **stats,
            "target_ms": 100.0,
            "predicted_rps": result.predicted.throughput_rps,
            "predicted_latency_ms": result.predicted.latency_ms,
        }
    )

    mid_blocks, mid_nodes = random_instance(25, 8, seed=1)
    for objective in ("throughput", "latency"):
        result = plan(mid_blocks, mid_nodes, objective=objective)
        stats = timed(lambda o=objective: plan(mid_blocks, mid_nodes, objective=o), max(10, args.runs // 10))
        rows.append(
            {
                "case": f"c: 25 blocks x 8 nodes ({objective[:3]})",
                "strategy": "optimal",
                **stats,
                "target_ms": 1000.0,
                "predicted_rps": result.predicted.throughput_rps,
                "predicted_latency_ms": result.predicted.latency_ms,
            }
        )
    # p95 at 90% of the throughput plan's rate: the node groupings simulated (planner/tail.py).
    rate = 0.9 * plan(mid_blocks, mid_nodes).predicted.throughput_rps
    result = plan(mid_blocks, mid_nodes, objective="p95", rate_rps=rate)
    runs = max(5, args.runs // 20)
    stats = timed(lambda: plan(mid_blocks, mid_nodes, objective="p95", rate_rps=rate), runs)
    rows.append(
        {
            "case": "c: 25 blocks x 8 nodes (p95)",
            "strategy": "optimal",
            **stats,
            "target_ms": 1000.0,
            "predicted_rps": result.predicted.throughput_rps,
            "predicted_latency_ms": result.predicted.latency_ms,
        }
    )
    print(f"planner benchmark on {platform.machine()} / Python {platform.python_version()}")
    head = f"{'case':28} {'strategy':10} {'median ms':>10} {'p95 ms':>9} {'target':>7}"
    print(f"{head} {'pred rps':>9} {'pred lat':>9}")
    for r in rows:
        ok = "ok" if r["median_ms"] < r["target_ms"] else "MISS"
        print(
            f"{r['case']:28} {r['strategy']:10} {r['median_ms']:10.3f} {r['p95_ms']:9.3f} "
            f"{ok:>7} {r['predicted_rps']:9.2f} {r['predicted_latency_ms']:9.1f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": platform.machine(), "python": platform.python_version(), "rows": rows}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
