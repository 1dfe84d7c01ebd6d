"""The node-wide model cache: the monitor's ModelCache server (real gRPC under real mutual TLS,
real files) and the storage initializer (``python -m amp4ec.operator.fetch --cache``, real
processes) against a real HTTPS store that counts its GETs.

Each test runs one event loop: the cache server, raw ModelCache calls with a Pod's certificate,
and initializer processes awaited as subprocesses.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import random
import socket
import sys
import threading
import zipfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from amp4ec import pki
from amp4ec.node_agent.authz import cache_namespace
from amp4ec.node_agent.model_cache import ModelCache
from amp4ec.node_agent.model_cache_server import CacheOptions, CacheServer
from amp4ec.node_agent.settings import AgentSettings
from amp4ec.wire import transport
from amp4ec.wire.v1 import agent_pb2, agent_pb2_grpc
from tests.operator.store import Store, certificate

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def archive(seed: int, size: int = 3 * MiB + 12345) -> bytes:
    """A ``.pt2``-like zip (stored, so about ``size`` bytes: several 1 MiB chunks)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
        z.writestr("model/data/0", random.Random(seed).randbytes(size))
    return buffer.getvalue()


@dataclass
class Node:
    """One node: its monitor's cache (in this process) and certificates of Pods of two namespaces."""

    tmp: Path
    ca: pki.CertificateAuthority
    store: Store
    name: str

    def pod_tls(self, identity: str) -> tuple[Path, Path, Path]:
        folder = self.tmp / "pods" / identity
        if not folder.exists():
            folder.mkdir(parents=True, mode=0o700)
            (folder / "ca.crt").write_bytes(self.ca.cert_pem)
            self.ca.issue(identity).write(folder, "tls")
        return folder / "ca.crt", folder / "tls.crt", folder / "tls.key"

    def security(self, identity: str) -> transport.TransportSecurity:
        return transport.TransportSecurity.from_files(*self.pod_tls(identity))

    def server(self, max_bytes: int = 64 * MiB, wait_s: float = 60.0) -> CacheServer:
        settings = AgentSettings(node=self.name, security=self.security(pki.MONITOR))
        return CacheServer.create(settings, CacheOptions(self.tmp / "models", max_bytes, 0, wait_s))

    def count(self, result: str) -> float:
        labels = {"node": self.name, "result": result}
        return REGISTRY.get_sample_value("amp4ec_model_cache_requests_total", labels) or 0.0

    async def initializer(self, path: str, identity: str, cache: str, out: Path) -> tuple[int, str, str]:
        """``python -m amp4ec.operator.fetch --cache`` as a shard Pod runs it: (exit, stdout, stderr)."""
        digest = hashlib.sha256(self.store.files[path]).hexdigest()
        ca, cert, key = self.pod_tls(identity)
        args = ["--uri", self.store.url(path), "--out", str(out), "--sha256", digest]
        args += ["--allow-network", "127.0.0.0/8", "--ca-file", str(self.tmp / "store.pem")]
        args += ["--cache", cache, "--tls-ca", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "amp4ec.operator.fetch", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
        )  # fmt: skip
        out_b, err_b = await asyncio.wait_for(proc.communicate(), 120)
        return proc.returncode or 0, out_b.decode(), err_b.decode()


_nodes = iter(range(1_000_000))


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    cert, key = certificate(tmp_path)
    with Store(cert, key) as store:
        yield Node(tmp_path, pki.CertificateAuthority.create("cache test CA"), store, f"cache-{next(_nodes)}")


TEAM_A0 = pki.stage_identity("team-a", "mine", 0)
TEAM_A1 = pki.stage_identity("team-a", "mine", 1)
TEAM_A_PROFILER = pki.profiler_identity("team-a", "mine")
TEAM_B0 = pki.stage_identity("team-b", "theirs", 0)


async def until(check: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    """Poll ``check`` on the running loop until it is truthy (what a test waits on, never a bare sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := check()):
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return value


def run(node: Node, scenario: Callable[[CacheServer, str], Awaitable[None]], **server: Any) -> None:
    async def main() -> None:
        cache = node.server(**server)
        await cache.start()
        try:
            await scenario(cache, f"127.0.0.1:{cache.port}")
        finally:
            await cache.stop(0)

    asyncio.run(main())


async def fetch_raw(node: Node, address: str, identity: str, sha256: str) -> tuple[str, bytes]:
    """One ModelCache.Fetch: ("hit", the file) read whole, or ("fill" | "miss", b"") at a miss."""
    async with transport.channel(address, node.security(identity), expect_identity=pki.MONITOR) as channel:
        call = agent_pb2_grpc.ModelCacheStub(channel).Fetch()
        await call.write(agent_pb2.CacheRequest(sha256=sha256))
        first = await call.read()
        if first.HasField("miss"):
            call.cancel()
            return ("fill" if first.miss.fill else "miss"), b""
        data = b""
        while (reply := await call.read()) is not grpc.aio.EOF:
            data += reply.chunk
        assert len(data) == first.size
        return "hit", data


async def upload_raw(
    node: Node,
    address: str,
    identity: str,
    sha256: str,
    size: int,
    chunks: list[bytes],
    end: bool = True,
    close: bool = True,
) -> tuple[grpc.StatusCode, str] | None:
    """Fill ``sha256`` (the caller must get the fill) with ``chunks`` announced as ``size`` bytes,
    then ``end`` and half-close (``close``); None once stored, else the refusal's status."""
    async with transport.channel(address, node.security(identity), expect_identity=pki.MONITOR) as channel:
        call = agent_pb2_grpc.ModelCacheStub(channel).Fetch()
        await call.write(agent_pb2.CacheRequest(sha256=sha256))
        first = await call.read()
        assert first.HasField("miss") and first.miss.fill, first
        try:
            await call.write(agent_pb2.CacheRequest(size=size))
            assert (await call.read()).accepted
            for chunk in chunks:
                await call.write(agent_pb2.CacheRequest(chunk=chunk))
            if end:
                await call.write(agent_pb2.CacheRequest(end=True))
            if close:
                await call.done_writing()
            reply = await call.read()
            assert reply.stored, reply
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return None


def test_a_pods_namespace_is_read_from_its_identity_only() -> None:
    assert pki.workload_namespace(TEAM_A0) == "team-a" == pki.workload_namespace(TEAM_A_PROFILER)
    dotted = pki.stage_identity("team-a", "edge.v2", 3)  # a deployment's name may hold dots
    assert pki.workload_namespace(dotted) == "team-a"
    for other in (pki.client_identity("team-a", "mine"), pki.MONITOR, pki.OPERATOR, pki.agent_identity("n1")):
        assert pki.workload_namespace(other) is None
    assert cache_namespace(frozenset({TEAM_A0, TEAM_A1})) == "team-a"
    assert cache_namespace(frozenset({TEAM_A0, TEAM_B0})) is None  # a certificate of two namespaces


def test_a_miss_is_fetched_and_filled_by_one_initializer_and_a_hit_skips_the_store(node: Node) -> None:
    data = archive(1)
    digest = hashlib.sha256(data).hexdigest()
    node.store.files["/m.pt2"] = data

    async def scenario(cache: CacheServer, address: str) -> None:
        code, out, err = await node.initializer("/m.pt2", TEAM_A0, address, node.tmp / "a" / "m.pt2")
        assert code == 0, err
        assert "(from the store, now in the node cache)" in out
        assert (node.tmp / "models" / "team-a" / digest).read_bytes() == data
        for identity, folder in ((TEAM_A1, "b"), (TEAM_A_PROFILER, "c")):  # a shard, the profiler
            code, out, err = await node.initializer("/m.pt2", identity, address, node.tmp / folder / "m.pt2")
            assert code == 0 and "(from the node cache)" in out, err
            assert (node.tmp / folder / "m.pt2").read_bytes() == data
            assert not (node.tmp / folder / "m.pt2.part").exists()
        assert node.store.requests == ["/m.pt2"]  # one fetch for the node
        assert (node.count("fill"), node.count("stored"), node.count("hit")) == (1, 1, 2)

    run(node, scenario)


def test_initializers_that_start_together_fetch_once(node: Node) -> None:
    """The first caller fills; the others wait for its upload (the store holds its answer until
    every initializer asked the monitor), then read the entry."""
    data = archive(2)
    node.store.files["/m.pt2"] = data
    node.store.hold["/m.pt2"] = release = threading.Event()

    async def scenario(cache: CacheServer, address: str) -> None:
        outs = [node.tmp / f"pod{i}" / "m.pt2" for i in range(3)]
        runs = [
            asyncio.create_task(node.initializer("/m.pt2", identity, address, out))
            for identity, out in zip((TEAM_A0, TEAM_A1, TEAM_A_PROFILER), outs, strict=True)
        ]
        await until(lambda: node.count("fill") == 1 and node.count("wait") == 2, "one filler and two waiters")
        assert node.store.requests == ["/m.pt2"]
        release.set()
        results = await asyncio.gather(*runs)
        assert all(code == 0 for code, _, _ in results), results
        sources = sorted(out.splitlines()[-1].rsplit("(from ", 1)[1] for _, out, _ in results)
        assert sources == ["the node cache)", "the node cache)", "the store, now in the node cache)"]
        assert all(out.read_bytes() == data for out in outs)
        assert node.store.requests == ["/m.pt2"]

    run(node, scenario)


def test_a_caller_that_waited_too_long_for_another_fill_fetches_for_itself(node: Node) -> None:
    data = archive(7, size=MiB)
    node.store.files["/m.pt2"] = data
    node.store.hold["/m.pt2"] = release = threading.Event()

    async def scenario(cache: CacheServer, address: str) -> None:
        filler = asyncio.create_task(node.initializer("/m.pt2", TEAM_A0, address, node.tmp / "a" / "m.pt2"))
        await until(lambda: node.store.requests == ["/m.pt2"], "the filler's GET")
        waiter = asyncio.create_task(node.initializer("/m.pt2", TEAM_A1, address, node.tmp / "b" / "m.pt2"))
        await until(lambda: len(node.store.requests) == 2, "the waiter's own GET, after its wait")
        assert node.count("wait") == node.count("timeout") == 1
        release.set()
        (code_a, out_a, err_a), (code_b, out_b, err_b) = await asyncio.gather(filler, waiter)
        assert code_a == code_b == 0, (err_a, err_b)
        assert "(from the store, now in the node cache)" in out_a
        assert "(from the store (another Pod's upload took too long))" in out_b

    run(node, scenario, wait_s=1.0)


def test_an_upload_is_kept_only_whole_and_under_its_own_digest(node: Node) -> None:
    data = archive(3, size=2 * MiB)
    digest = hashlib.sha256(data).hexdigest()
    other = archive(4, size=2 * MiB)
    assert len(other) == len(data)

    async def scenario(cache: CacheServer, address: str) -> None:
        wrong = await upload_raw(node, address, TEAM_A0, digest, len(other), [other[:MiB], other[MiB:]])
        assert wrong is not None and wrong[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert f"not {digest} it was offered under" in wrong[1]
        partial = await upload_raw(node, address, TEAM_A0, digest, len(data), [data[:MiB]], end=False)
        assert partial is not None and partial[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert f"stopped after {MiB} of {len(data)} bytes" in partial[1]
        # One chunk past the size announced, then nothing more (a write after the refusal would
        # race with it): the refusal's status is what the next read gets.
        longer = await upload_raw(
            node, address, TEAM_A0, digest, MiB // 2, [data[:MiB]], end=False, close=False
        )
        assert longer is not None and "chunk: more bytes than the 524288 announced" in longer[1]
        # A filler that goes away mid-upload releases its fill and leaves nothing behind.
        async with transport.channel(address, node.security(TEAM_A0), expect_identity=pki.MONITOR) as channel:
            call = agent_pb2_grpc.ModelCacheStub(channel).Fetch()
            await call.write(agent_pb2.CacheRequest(sha256=digest))
            assert (await call.read()).miss.fill
            await call.write(agent_pb2.CacheRequest(size=len(data)))
            await call.write(agent_pb2.CacheRequest(chunk=data[:MiB]))
            await until(
                lambda: any((node.tmp / "models" / ".partial").iterdir()), "the upload's temporary file"
            )
            call.cancel()
        await until(lambda: cache.cache.filling(("team-a", digest)) is None, "the fill to be released")
        assert not any((node.tmp / "models" / ".partial").iterdir())
        assert cache.cache.keys() == [] and node.count("refused") == 4  # the cancelled one too
        assert await fetch_raw(node, address, TEAM_A0, digest) == ("fill", b"")  # still a miss
        assert await upload_raw(node, address, TEAM_A0, digest, len(data), [data[:MiB], data[MiB:]]) is None
        assert await fetch_raw(node, address, TEAM_A1, digest) == ("hit", data)

    run(node, scenario)


def test_namespaces_never_share_an_entry_and_other_identities_are_refused(node: Node) -> None:
    data = archive(5, size=MiB)
    digest = hashlib.sha256(data).hexdigest()

    async def scenario(cache: CacheServer, address: str) -> None:
        assert await upload_raw(node, address, TEAM_A0, digest, len(data), [data]) is None
        assert await fetch_raw(node, address, TEAM_A1, digest) == ("hit", data)
        # team-b knows the digest: still a miss of its own (it fetches, with its own credentials).
        assert await fetch_raw(node, address, TEAM_B0, digest) == ("fill", b"")
        for identity in (pki.client_identity("team-a", "mine"), pki.MONITOR, pki.OPERATOR):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await fetch_raw(node, address, identity, digest)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, identity
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await fetch_raw(node, address, TEAM_A0, "../team-b/" + digest[:54])
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sha256: expected 64" in str(
            bad.value
        )
        assert cache.cache.keys() == [("team-a", digest)]

    run(node, scenario)


def test_least_recently_used_entries_are_evicted_and_a_restart_keeps_the_rest(node: Node) -> None:
    files = [archive(10 + i, size=MiB) for i in range(3)]
    digests = [hashlib.sha256(f).hexdigest() for f in files]
    size = len(files[0])

    async def fill_two(cache: CacheServer, address: str) -> None:
        for data, digest in zip(files[:2], digests[:2], strict=True):
            assert await upload_raw(node, address, TEAM_A0, digest, size, [data]) is None
        assert (await fetch_raw(node, address, TEAM_A0, digests[0]))[0] == "hit"  # 0 used last

    run(node, fill_two, max_bytes=5 * size // 2)
    (node.tmp / "models" / ".partial" / "left-by-a-crash").write_bytes(b"half")

    async def after_restart(cache: CacheServer, address: str) -> None:
        assert not any((node.tmp / "models" / ".partial").iterdir())
        assert cache.cache.keys() == [("team-a", digests[1]), ("team-a", digests[0])]
        assert await upload_raw(node, address, TEAM_A0, digests[2], size, [files[2]]) is None
        assert cache.cache.keys() == [("team-a", digests[0]), ("team-a", digests[2])]  # 1 evicted
        assert not (node.tmp / "models" / "team-a" / digests[1]).exists()
        too_big = archive(20, size=3 * MiB)
        refused = await upload_raw(
            node, address, TEAM_A0, hashlib.sha256(too_big).hexdigest(), len(too_big), []
        )
        assert refused is not None and refused[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than the whole cache" in refused[1]

    run(node, after_restart, max_bytes=5 * size // 2)


def test_the_initializer_fetches_itself_when_the_monitor_is_down_or_its_copy_is_bad(node: Node) -> None:
    data = archive(6, size=MiB)
    digest = hashlib.sha256(data).hexdigest()
    node.store.files["/m.pt2"] = data

    async def down() -> None:
        code, out, err = await node.initializer("/m.pt2", TEAM_A0, closed_address(), node.tmp / "a" / "m.pt2")
        assert code == 0 and "(from the store)" in out, err
        assert "node cache: " in err and "UNAVAILABLE" in err and "fetching from the store" in err

    asyncio.run(down())
    assert node.store.requests == ["/m.pt2"]

    async def corrupted(cache: CacheServer, address: str) -> None:
        assert await upload_raw(node, address, TEAM_A0, digest, len(data), [data]) is None
        entry = node.tmp / "models" / "team-a" / digest
        changed = bytearray(data)
        changed[len(data) // 2] ^= 0xFF
        entry.write_bytes(changed)  # the disk changed under the monitor
        code, out, err = await node.initializer("/m.pt2", TEAM_A1, address, node.tmp / "b" / "m.pt2")
        assert code == 0 and "(from the store)" in out and "DATA_LOSS" in err, err
        assert (node.tmp / "b" / "m.pt2").read_bytes() == data
        assert not entry.exists() and cache.cache.keys() == []  # dropped: the next caller fills it again

    run(node, corrupted)
    assert node.store.requests == ["/m.pt2", "/m.pt2"]


def closed_address() -> str:
    """``127.0.0.1:<port>`` where nothing listens (a monitor that is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_a_cache_smaller_than_nothing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--model-cache-size"):
        ModelCache(tmp_path, 0)


def test_the_monitors_cache_flags_say_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from amp4ec.node_agent.cli import parse_args

    ca = pki.CertificateAuthority.create()
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    ca.issue(pki.MONITOR).write(tmp_path, "tls")
    tls = ["--tls-ca", str(tmp_path / "ca.crt"), "--tls-cert", str(tmp_path / "tls.crt")]
    tls += ["--tls-key", str(tmp_path / "tls.key")]
    monitor = ["--monitor-interval", "5", "--control-port", "0", "--cpu-limit", "1"]
    cache = ["--model-cache", str(tmp_path / "models")]
    *_, parsed = parse_args([*tls, *monitor, *cache, "--model-cache-size", "512Mi"])
    assert parsed is not None and parsed.model_cache == CacheOptions(tmp_path / "models", 512 << 20, 50054)
    for argv, message in (
        ([*tls, *monitor, *cache, "--model-cache-size", "lots"], "--model-cache-size: expected a size like"),
        (["--insecure", *monitor, *cache], "--model-cache: entries are keyed by the caller's certificate"),
        ([*tls, *cache], "--model-cache: only the monitor role"),
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err
