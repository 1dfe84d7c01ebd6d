"""Argument checks for the planner: every bad input becomes an InvalidSpec naming its field and index."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise
from typing import Any

from amp4ec.errors import InvalidSpec, PlanInfeasible
from amp4ec.planner.types import (
    CodecProfile,
    LayerProfile,
    Link,
    NodeCapacity,
    Pin,
    SchedulerHistory,
    TileRows,
)

__all__ = [
    "CLIENT",
    "DEFAULT_LINK",
    "check_blocks",
    "check_choice",
    "check_codecs",
    "check_history",
    "check_input_bytes",
    "check_link",
    "check_links",
    "check_max_error",
    "check_max_stages",
    "check_nodes",
    "check_pins",
    "check_rate",
    "check_threshold",
]

CLIENT = "client"
"""Pseudo-node where requests come from and results return to."""

DEFAULT_LINK = Link(CLIENT, CLIENT, rtt_ms=0.2, bandwidth_bytes_per_s=1e9)
"""Used for any pair without a declared link: loopback-like, 0.2 ms round trip, 1 GB/s."""


def _ensure_number(value: Any, field: str, *, positive: bool = False, allow_inf: bool = False) -> float:
    """A real number ≥ 0 (> 0 if ``positive``), never nan, finite unless ``allow_inf``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidSpec(f"{field}: expected a number, got {value!r}")
    x = float(value)
    if math.isnan(x) or (math.isinf(x) and not allow_inf):
        raise InvalidSpec(f"{field}: expected a finite number, got {value!r}")
    if x < 0 or (positive and x == 0):
        raise InvalidSpec(f"{field}: expected a number {'> 0' if positive else '≥ 0'}, got {value!r}")
    return x


def _ensure_count(value: Any, field: str, *, minimum: int = 0) -> int:
    """An integer ≥ ``minimum`` (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpec(f"{field}: expected an integer, got {value!r}")
    if value < minimum:
        raise InvalidSpec(f"{field}: expected an integer ≥ {minimum}, got {value!r}")
    return value


def _ensure_name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidSpec(f"{field}: expected a non-empty string, got {value!r}")
    return value


def check_choice(value: Any, field: str, choices: Sequence[str]) -> str:
    """One of ``choices``; the message lists the valid ones."""
    if value not in choices:
        raise InvalidSpec(f"{field}: unknown value {value!r}; valid: {', '.join(choices)}")
    return str(value)


def check_blocks(blocks: Any) -> tuple[LayerProfile, ...]:
    """A non-empty sequence of LayerProfile with sane numbers."""
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Iterable):
        raise InvalidSpec(f"blocks: expected a sequence of LayerProfile, got {type(blocks).__name__}")
    out = tuple(blocks)
    if not out:
        raise InvalidSpec("blocks: the model has no blocks")
    for i, b in enumerate(out):
        if not isinstance(b, LayerProfile):
            raise InvalidSpec(f"blocks[{i}]: expected a LayerProfile, got {type(b).__name__}")
        for name in ("flops", "param_bytes", "out_bytes", "act_bytes"):
            _ensure_count(getattr(b, name), f"blocks[{i}].{name}")
        _ensure_number(b.compute_ms, f"blocks[{i}].compute_ms")
        _check_batch_ms(b.batch_ms, f"blocks[{i}].batch_ms")
        if b.tile is not None:
            _check_tile(b.tile, f"blocks[{i}].tile")
    return out


def _check_batch_ms(pairs: Any, field: str) -> None:
    """(batch, ms) pairs with distinct increasing batches ≥ 2 and sane times."""
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise InvalidSpec(f"{field}: expected (batch, ms) pairs, got {type(pairs).__name__}")
    last = 1
    for k, pair in enumerate(pairs):
        if not (isinstance(pair, Sequence) and len(pair) == 2):
            raise InvalidSpec(f"{field}[{k}]: expected a (batch, ms) pair, got {pair!r}")
        batch, ms = pair
        if isinstance(batch, bool) or not isinstance(batch, int) or batch <= last:
            raise InvalidSpec(f"{field}[{k}]: expected an integer batch above {last}, got {batch!r}")
        _ensure_number(ms, f"{field}[{k}].ms")
        last = batch


def _check_tile(t: Any, field: str) -> None:
    """Row geometry whose every output row reads a non-empty, in-range, ordered input span
    (it comes from a profiler Pod running the user's model: never index past it)."""
    if not isinstance(t, TileRows):
        raise InvalidSpec(f"{field}: expected TileRows, got {type(t).__name__}")
    rows_in = _ensure_count(t.in_height, f"{field}.in_height", minimum=1)
    rows_out = _ensure_count(t.out_height, f"{field}.out_height", minimum=1)
    _ensure_number(t.codec_ns_per_byte, f"{field}.codec_ns_per_byte")
    _ensure_number(t.fixed, f"{field}.fixed")
    _ensure_number(t.overhead, f"{field}.overhead")
    if t.fixed > 1.0:
        raise InvalidSpec(f"{field}.fixed: expected a fraction of the block's time (0..1), got {t.fixed!r}")
    for name in ("lo", "hi"):
        values = getattr(t, name)
        if not isinstance(values, Sequence) or len(values) != rows_out:
            raise InvalidSpec(f"{field}.{name}: expected {rows_out} entries (one per output row)")
    for r, (lo, hi) in enumerate(zip(t.lo, t.hi, strict=True)):
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo < hi <= rows_in):
            raise InvalidSpec(f"{field}: output row {r} reads rows {lo!r}..{hi!r}, not within 0..{rows_in}")
    if any(a > b for a, b in pairwise(t.lo)) or any(a > b for a, b in pairwise(t.hi)):
        raise InvalidSpec(f"{field}: input rows must not decrease from one output row to the next")


CODEC_NAMES = ("fp16", "int8")
"""The codecs a CodecProfile may describe (raw is implicit: every cut may travel raw)."""


def check_codecs(codecs: Any, num_blocks: int) -> tuple[CodecProfile, ...]:
    """CodecProfiles of known, distinct codecs with ``num_blocks + 1`` sane entries per field."""
    if isinstance(codecs, (str, bytes)) or not isinstance(codecs, Iterable):
        raise InvalidSpec(f"codecs: expected a sequence of CodecProfile, got {type(codecs).__name__}")
    out = tuple(codecs)
    seen: set[str] = set()
    for i, c in enumerate(out):
        if not isinstance(c, CodecProfile):
            raise InvalidSpec(f"codecs[{i}]: expected a CodecProfile, got {type(c).__name__}")
        if c.name not in CODEC_NAMES or c.name in seen:
            raise InvalidSpec(
                f"codecs[{i}].name: expected one of {', '.join(CODEC_NAMES)}, each once, got {c.name!r}"
            )
        seen.add(c.name)
        for name in ("wire_bytes", "encode_ms", "decode_ms", "error"):
            values = getattr(c, name)
            if not isinstance(values, Sequence) or len(values) != num_blocks + 1:
                raise InvalidSpec(
                    f"codecs[{i}].{name}: expected {num_blocks + 1} entries (one per cut, the output "
                    f"included), got {len(values) if isinstance(values, Sequence) else type(values).__name__}"
                )
            for j, v in enumerate(values):
                field = f"codecs[{i}].{name}[{j}]"
                _ensure_count(v, field) if name == "wire_bytes" else _ensure_number(v, field)
    return out


def check_max_error(value: Any) -> float | None:
    """None (no bound) or a relative error ≥ 0."""
    return None if value is None else _ensure_number(value, "max_error")


def check_nodes(nodes: Any) -> tuple[NodeCapacity, ...]:
    """At least one NodeCapacity (else PlanInfeasible), unique names other than ``client``, usable speed."""
    if isinstance(nodes, (str, bytes)) or not isinstance(nodes, Iterable):
        raise InvalidSpec(f"nodes: expected a sequence of NodeCapacity, got {type(nodes).__name__}")
    out = tuple(nodes)
    if not out:
        raise PlanInfeasible("nodes: no nodes to plan on (zero nodes)")
    seen: set[str] = set()
    for i, n in enumerate(out):
        if not isinstance(n, NodeCapacity):
            raise InvalidSpec(f"nodes[{i}]: expected a NodeCapacity, got {type(n).__name__}")
        name = _ensure_name(n.name, f"nodes[{i}].name")
        if name == CLIENT:
            raise InvalidSpec(f"nodes[{i}].name: {CLIENT!r} is reserved for the request source")
        if name in seen:
            raise InvalidSpec(f"nodes[{i}].name: duplicate node name {name!r}")
        seen.add(name)
        _ensure_number(n.cpu, f"nodes[{i}].cpu")
        _ensure_count(n.memory_bytes, f"nodes[{i}].memory_bytes")
        _ensure_number(n.speed, f"nodes[{i}].speed")
        _ensure_number(n.overhead_ms, f"nodes[{i}].overhead_ms")
        load = _ensure_number(n.load, f"nodes[{i}].load")
        if load > 1:
            raise InvalidSpec(f"nodes[{i}].load: expected a utilisation in [0, 1], got {n.load!r}")
        if not n.effective_speed > 0:
            raise InvalidSpec(f"nodes[{i}].cpu: node {name!r} has no speed (cpu 0 and speed unset)")
    return out


def check_link(link: Any, field: str) -> Link:
    """A Link with a non-negative round trip and a positive bandwidth (inf allowed)."""
    if not isinstance(link, Link):
        raise InvalidSpec(f"{field}: expected a Link, got {type(link).__name__}")
    _ensure_name(link.src, f"{field}.src")
    _ensure_name(link.dst, f"{field}.dst")
    _ensure_number(link.rtt_ms, f"{field}.rtt_ms")
    bandwidth = f"{field}.bandwidth_bytes_per_s"
    _ensure_number(link.bandwidth_bytes_per_s, bandwidth, positive=True, allow_inf=True)
    return link


def check_links(links: Any) -> dict[tuple[str, str], Link]:
    """Links keyed by (src, dst); a mapping's values or an iterable of Link. Later ones win;
    links naming nodes outside the plan are kept but never looked up; self-links are dropped."""
    if links is None:
        return {}
    items = links.values() if isinstance(links, Mapping) else links
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise InvalidSpec(f"links: expected Links, got {type(links).__name__}")
    table: dict[tuple[str, str], Link] = {}
    for i, link in enumerate(items):
        check_link(link, f"links[{i}]")
        if link.src != link.dst:
            table[(link.src, link.dst)] = link
    return table


def check_pins(pins: Any, n_blocks: int, node_names: Sequence[str]) -> tuple[Pin, ...]:
    """Pins inside the model, on known nodes, one per node, not overlapping; sorted by block."""
    if isinstance(pins, (str, bytes)) or not isinstance(pins, Iterable):
        raise InvalidSpec(f"pinned: expected a sequence of Pin, got {type(pins).__name__}")
    out = tuple(pins)
    known = set(node_names)
    for i, p in enumerate(out):
        if not isinstance(p, Pin):
            raise InvalidSpec(f"pinned[{i}]: expected a Pin, got {type(p).__name__}")
        first = _ensure_count(p.first_block, f"pinned[{i}].first_block")
        last = _ensure_count(p.last_block, f"pinned[{i}].last_block")
        if last < first or last >= n_blocks:
            raise InvalidSpec(
                f"pinned[{i}]: block range {first}..{last} is not inside the model's 0..{n_blocks - 1}"
            )
        if p.node not in known:
            raise InvalidSpec(f"pinned[{i}].node: unknown node {p.node!r}")
    ordered = sorted(out, key=lambda p: p.first_block)
    for a, b in pairwise(ordered):
        if b.first_block <= a.last_block:
            raise InvalidSpec(
                f"pinned: ranges {a.first_block}..{a.last_block} and {b.first_block}..{b.last_block} overlap"
            )
    nodes = [p.node for p in ordered]
    for name in nodes:
        if nodes.count(name) > 1:
            raise InvalidSpec(f"pinned: node {name!r} is pinned twice (one stage per node)")
    return tuple(ordered)


def check_max_stages(value: Any) -> int | None:
    """None (no cap) or an integer ≥ 1."""
    return None if value is None else _ensure_count(value, "max_stages", minimum=1)


def check_rate(value: Any, objective: str) -> float | None:
    """The ``p95`` objective's target rate: a positive finite number of requests per second,
    required by it and refused by the other objectives (they do not depend on a rate)."""
    if objective != "p95":
        if value is not None:
            raise InvalidSpec(f"rate_rps: only objective p95 takes a target rate, not {objective!r}")
        return None
    if value is None:
        raise InvalidSpec("rate_rps: the p95 objective needs a target rate (requests per second)")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise InvalidSpec(f"rate_rps: expected a positive finite rate in requests/s, got {value!r}")
    return float(value)


def check_max_batch(value: Any) -> int:
    """The most requests one forward may gather: an integer ≥ 1."""
    return _ensure_count(value, "max_batch", minimum=1)


def check_history(history: Any) -> SchedulerHistory | None:
    """None or a SchedulerHistory with non-negative times and counts."""
    if history is None:
        return None
    if not isinstance(history, SchedulerHistory):
        raise InvalidSpec(f"history: expected a SchedulerHistory, got {type(history).__name__}")
    for node, times in history.exec_times_s.items():
        for i, t in enumerate(times):
            _ensure_number(t, f"history.exec_times_s[{node!r}][{i}]")
    for node, count in history.task_counts.items():
        _ensure_count(count, f"history.task_counts[{node!r}]")
    return history


def check_threshold(value: Any) -> float:
    """A relative gain threshold ≥ 0 (0.1 = 10 %)."""
    return _ensure_number(value, "threshold")


def check_input_bytes(value: Any) -> int:
    """Bytes of the request's input tensor, ≥ 0."""
    return _ensure_count(value, "input_bytes")
