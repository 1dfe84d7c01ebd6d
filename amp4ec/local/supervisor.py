"""Local mode recovers: notice a dead or hung agent, re-plan on the survivors, switch traffic.

[Note: local failover] The supervisor watches every agent two ways: its process exit (a
pidfd, noticed at once) and its health check (every ``interval_s``; ``misses`` answers
missing ``timeout_s`` in a row = hung). On a fault it
1. stops sending into the pipelines that crossed the failed node: the client retires them,
   and the requests waiting on them are retried on the pipelines left (or wait for one);
2. re-plans on the surviving nodes with the same planner and inputs;
3. keeps the intact pipelines when the new plan is not clearly better (10%): replicas lose
   nothing and reload nothing; otherwise it loads the new plan's changed stages while the
   pipelines it keeps unchanged serve on, and only then points the client at the new plan.
An agent serves one layer range, so a survivor whose range changes is taken out of service
before it is reloaded: no request ever meets a half-switched pipeline. The failover's
record says what failed, when, and when the new plan served (``recovery_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from amp4ec.client import Client, Endpoint
from amp4ec.errors import Amp4ecError, InvalidSpec
from amp4ec.local.cluster import LocalCluster
from amp4ec.nodes import FaultSpec, parse_fault  # re-exported: where faults are injected
from amp4ec.planner.load import pipeline_times
from amp4ec.planner.types import Pipeline, Plan, Prediction

__all__ = ["Failover", "FaultSpec", "Supervisor", "inject_faults", "parse_fault"]

log = logging.getLogger(__name__)
KEEP_UNLESS_GAIN = 0.10
"""A new plan replaces the intact pipelines only if it predicts this much more throughput."""

Replan = Callable[[Sequence[str]], Plan]
"""A plan over these surviving nodes (raises PlanInfeasible when they cannot hold the model)."""
Deploy = Callable[[Plan], Awaitable[Any]]
"""Load every stage of these pipelines on its node."""


def endpoints(plan: Plan, address: Callable[[str], str]) -> list[Endpoint]:
    """Each pipeline's entry, named for errors (``stage 0 on node0``), with the identity its
    agent presents under mutual TLS, and its predicted latency and interval."""
    out = []
    for pipeline in plan.pipelines:
        node = pipeline.stages[0].node
        latency, interval = pipeline_times(pipeline)  # dispatch's first estimates (amp4ec.dispatch)
        identity = LocalCluster.identity(node)
        out.append(Endpoint(address(node), f"stage 0 on {node}", identity, latency, interval))
    return out


@dataclass
class Failover:
    node: str
    kind: str
    """``exited`` (process gone) or ``hung`` (health checks unanswered)."""
    detail: str
    detected_s: float
    """Seconds since the run's clock started (the measured requests)."""
    plan_before: list[dict[str, Any]]
    fault_s: float | None = None
    """When the fault was injected (``--fault``), if it was."""
    recovered_s: float | None = None
    """When the plan on the survivors took traffic."""
    plan_after: list[dict[str, Any]] = field(default_factory=list)
    replanned: bool = False
    """True: new stages were loaded; False: the intact pipelines were kept."""
    error: str = ""
    """Why no plan serves on the survivors, if none does."""

    @property
    def recovery_s(self) -> float | None:
        """From the fault (or its detection, when not injected) to the new plan serving."""
        if self.recovered_s is None:
            return None
        return self.recovered_s - (self.fault_s if self.fault_s is not None else self.detected_s)

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "kind": self.kind,
            "detail": self.detail,
            "fault_s": self.fault_s,
            "detected_s": self.detected_s,
            "recovered_s": self.recovered_s,
            "recovery_s": self.recovery_s,
            "replanned": self.replanned,
            "plan_before": self.plan_before,
            "plan_after": self.plan_after,
            "error": self.error,
        }


def _key(pipeline: Pipeline) -> tuple[tuple[Any, ...], ...]:
    return tuple(
        (
            s.node,
            s.first_block,
            s.last_block,
            *((g.first_block, g.last_block, g.nodes, g.rows) for g in s.tiles),
        )
        for s in pipeline.stages
    )


def _nodes(pipeline: Pipeline) -> set[str]:
    """Every node a pipeline runs on, tile nodes included."""
    return {n for s in pipeline.stages for n in s.nodes}


def _subset(plan: Plan, pipelines: Sequence[Pipeline]) -> Plan:
    """The plan cut down to some of its pipelines, its prediction recomputed from their stages."""
    stage_ms = tuple(s.stage_ms for p in pipelines for s in p.stages)
    intervals = [max(s.interval_ms for s in p.stages) for p in pipelines]
    rps = sum(1000 / max(ms, 1e-9) for ms in intervals)
    latency = min((sum(s.stage_ms for s in p.stages) for p in pipelines), default=float("inf"))
    predicted = Prediction(stage_ms, max(intervals, default=0.0), latency, rps)
    return replace(plan, pipelines=tuple(pipelines), predicted=predicted)


class Supervisor:
    """Watches a LocalCluster's agents serving ``plan`` and fails over (see [Note: local failover])."""

    def __init__(
        self,
        cluster: LocalCluster,
        client: Client,
        plan: Plan,
        replan: Replan,
        deploy: Deploy,
        *,
        address: Callable[[str], str] | None = None,
        interval_s: float = 0.5,
        timeout_s: float = 1.0,
        misses: int = 2,
        clock_start: float | None = None,
    ) -> None:
        self.cluster, self.client, self.plan = cluster, client, plan
        self._replan, self._deploy = replan, deploy
        self._address = address or cluster.address
        self.interval_s, self.timeout_s, self.misses = interval_s, timeout_s, misses
        self.start = time.monotonic() if clock_start is None else clock_start
        self.failovers: list[Failover] = []
        self.dead: set[str] = set()
        self.injected: dict[str, float] = {}
        """node → when a fault was injected into it (run clock)."""
        self.ignored: set[str] = set()
        """Nodes being shut down on purpose: their exit is no fault."""
        self._lock = asyncio.Lock()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        """node → its health watch."""
        self._fds: dict[str, int] = {}
        """node → the pidfd its exit is noticed on."""
        self._failing: set[asyncio.Task[None]] = set()
        self.changed = asyncio.Event()
        """Set after every failover (tests wait on it)."""

    async def recovered(self, failovers: int = 1) -> list[Failover]:
        """Wait until ``failovers`` failovers happened and each has finished (recovered or not)."""
        while len(self.failovers) < failovers or self._lock.locked():
            await self.changed.wait()
        return self.failovers

    def now(self) -> float:
        return time.monotonic() - self.start

    async def __aenter__(self) -> Supervisor:
        for name in self.cluster.agents:
            self.watch(name)
        return self

    def watch(self, node: str) -> None:
        """Watch ``node``'s agent (its exit and its health); every agent at entry is watched."""
        loop = asyncio.get_running_loop()
        self.dead.discard(node)
        self.ignored.discard(node)
        self._tasks[node] = loop.create_task(self._watch_health(node))
        try:
            fd = os.pidfd_open(self.cluster.agents[node].process.pid)
        except (AttributeError, OSError):  # no pidfd: the health check notices the exit too
            return
        self._fds[node] = fd
        loop.add_reader(fd, self._exited, node, fd)

    async def unwatch(self, node: str) -> None:
        """Stop watching ``node`` (about to be stopped on purpose: its exit is no fault)."""
        self.ignored.add(node)
        fd = self._fds.pop(node, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)
        task = self._tasks.pop(node, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def __aexit__(self, *exc: object) -> None:
        for node in list(self._fds):
            await self.unwatch(node)
        tasks = [*self._tasks.values(), *self._failing]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def lock(self) -> asyncio.Lock:
        """Held while the plan changes (a failover, or ``amp4ec serve`` applying a nodes file)."""
        return self._lock

    def retire(self, nodes: Collection[str]) -> None:
        """Stop sending into the pipelines that cross ``nodes`` (about to be stopped)."""
        self.plan = _subset(self.plan, [p for p in self.plan.pipelines if not _nodes(p) & set(nodes)])
        self.client.set_entries(endpoints(self.plan, self._address))

    async def switch(self, new: Plan) -> None:
        """Move traffic to ``new`` make-before-break: pipelines it keeps as they are serve on,
        the others are taken out of service, reloaded, and then serve."""
        same = {_key(p) for p in new.pipelines}
        serving = [p for p in self.plan.pipelines if _key(p) in same and not _nodes(p) & self.dead]
        self.client.set_entries(endpoints(_subset(self.plan, serving), self._address))
        unchanged = {_key(p) for p in serving}
        await self._deploy(_subset(new, [p for p in new.pipelines if _key(p) not in unchanged]))
        self.plan = new
        self.client.set_entries(endpoints(self.plan, self._address))

    def _exited(self, node: str, fd: int) -> None:
        asyncio.get_running_loop().remove_reader(fd)
        if self._fds.get(node) == fd:
            del self._fds[node]
            os.close(fd)
        agent = self.cluster.agents.get(node)
        if node in self.injected:
            detail = "was killed (SIGKILL) by the injected fault"
        elif agent is not None and agent.process.poll() is not None:
            detail = agent.exit_reason()
        else:
            detail = "exited"
        task = asyncio.get_running_loop().create_task(self.fail(node, "exited", f"agent {detail}"))
        self._failing.add(task)
        task.add_done_callback(self._failing.discard)

    async def _watch_health(self, node: str) -> None:
        missed = 0
        while node not in self.dead and node not in self.ignored:
            started = time.monotonic()
            if await self.cluster.serving(node, self.timeout_s):
                missed = 0
            else:
                missed += 1
                if missed >= self.misses:
                    detail = f"no health answer within {self.timeout_s:g} s, {missed} times in a row"
                    await self.fail(node, "hung", detail)
                    return
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def fail(self, node: str, kind: str, detail: str) -> None:
        """Take ``node`` out of service and serve on the survivors (idempotent per node)."""
        async with self._lock:
            if node in self.dead or node in self.ignored:
                return
            self.dead.add(node)
            record = Failover(
                node, kind, detail, self.now(), self.plan.rows(), fault_s=self.injected.get(node)
            )
            self.failovers.append(record)
            log.warning("%s %s: %s; re-planning on the survivors", node, kind, detail)
            try:
                await self._recover(record)
            except Amp4ecError as e:
                record.error = str(e)
                log.error("no plan serves on the survivors of %s: %s", node, e)
                if not self.client.entries:
                    self.client.give_up(f"{node} {kind} and the survivors cannot serve the model: {e}")
            self.changed.set()
            self.changed = asyncio.Event()

    async def _recover(self, record: Failover) -> None:
        intact = [p for p in self.plan.pipelines if not _nodes(p) & self.dead]
        # 1. Nothing more goes into the broken pipelines; what waits on them is retried.
        self.client.set_entries(endpoints(_subset(self.plan, intact), self._address))
        alive = [n for n in self.cluster.agents if n not in self.dead]
        new = self._replan(alive)
        kept = _subset(self.plan, intact)
        if intact and new.predicted.throughput_rps <= kept.predicted.throughput_rps * (1 + KEEP_UNLESS_GAIN):
            self.plan = kept
            self.client.set_entries(endpoints(self.plan, self._address))
        else:
            # 2. Pipelines the new plan keeps as they are serve on; the rest are reloaded;
            # 3. then traffic moves to the plan on the survivors.
            self.plan = _subset(self.plan, intact)
            await self.switch(new)
            record.replanned = True
        record.recovered_s = self.now()
        record.plan_after = self.plan.rows()


@contextlib.asynccontextmanager
async def inject_faults(
    cluster: LocalCluster, faults: Sequence[FaultSpec], supervisor: Supervisor
) -> AsyncIterator[None]:
    """Signal each fault's agent at its time (SIGKILL or SIGSTOP); at exit, a stopped agent is
    killed and continued, so nothing is left behind stopped."""
    for fault in faults:
        if fault.node not in cluster.agents:
            raise InvalidSpec(
                f"--fault {fault}: no node {fault.node!r}; nodes are {', '.join(cluster.agents)}"
            )
    stopped: list[tuple[str, int]] = []

    async def inject(fault: FaultSpec) -> None:
        await asyncio.sleep(max(0.0, fault.at_s - supervisor.now()))  # a schedule, not a synchronisation
        process = cluster.agents[fault.node].process
        if process.poll() is not None:
            return
        supervisor.injected[fault.node] = supervisor.now()
        if fault.kind == "kill":
            process.send_signal(signal.SIGKILL)
        else:
            stopped.append((fault.node, process.pid))
            process.send_signal(signal.SIGSTOP)
        log.warning("injected %s", fault)

    tasks = [asyncio.get_running_loop().create_task(inject(f)) for f in faults]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for node, pid in stopped:
            supervisor.ignored.add(node)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
