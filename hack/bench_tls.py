#!/usr/bin/env python3
"""What mutual TLS adds to one hop (not a test): mTLS against plaintext, on loopback, in seconds.

One hop as a pipeline has it: a ``ShardStream`` (what a stage uses to reach its next hop, and
the client to reach the entry) sends an activation to a real agent ``ShardServicer`` serving
a stage whose answer is small (1x1000 floats, a classifier's output). For each activation
size it reports, per request, the CPU time of this process (both ends: sender and receiver)
and the wall time, plaintext and mTLS, and their difference. ``amp4ec bench`` measures the
end-to-end effect on the standard configuration; this isolates the per-byte cost.

    .venv/bin/python hack/bench_tls.py [--requests 200] [--rounds 3] [--sizes 4096,602112,1204224]

Sizes are activation bytes (float32): 602112 = 1x3x224x224 (MobileNetV2's input), 1204224 =
1x96x56x56 (its largest cut). The two modes alternate, round by round, in turns (ABBA), and each
figure is the median over the rounds, so a machine whose load changes during the run skews both alike. The
last column is what the cipher alone costs (AES-128-GCM, the suite BoringSSL picks on a CPU with
AES instructions: encrypting and decrypting the bytes once, through OpenSSL's implementation in
``cryptography``), to tell the cipher from the rest of TLS in gRPC (records, copies).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from grpc_health.v1 import health
from torch import fx, nn

from amp4ec import pki
from amp4ec.node_agent.authz import data_policy
from amp4ec.node_agent.executor import LoadedStage, StageConfig, StageExecutor
from amp4ec.node_agent.repository import StageRepository
from amp4ec.node_agent.servicer import ShardServicer
from amp4ec.node_agent.settings import AgentSettings
from amp4ec.slicing.blocks import Block, Shard, TensorSpec
from amp4ec.wire import codec, transport
from amp4ec.wire.stream import ShardStream
from amp4ec.wire.v1 import shard_pb2, shard_pb2_grpc

IDENTITY = "agent.bench.amp4ec"


class _Head(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x.flatten()[:1000].view(1, 1000),)


def _stage(elements: int) -> LoadedStage:
    block = Block(0, "head", fx.symbolic_trace(_Head()))
    specs = ((TensorSpec((1, elements), torch.float32),), (TensorSpec((1, 1000), torch.float32),))
    config = StageConfig(model="bench", first_block=0, last_block=0, accept_from=(IDENTITY,))
    return LoadedStage(config, Shard([block], *specs), num_blocks=1)


async def one_hop(security: transport.TransportSecurity, elements: int, requests: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per request over ``requests`` requests, after a warm-up."""
    settings = AgentSettings(security=security)
    repository = StageRepository(settings, health.aio.HealthServicer())
    repository.serve(_stage(elements))
    executor = StageExecutor(cpu_limit=1.0)
    server = transport.server(security, data_policy(repository), settings.grpc_options())
    shard_pb2_grpc.add_ShardServicer_to_server(
        ShardServicer(settings, repository, executor, observe=False), server
    )
    port = transport.add_port(server, "127.0.0.1:0", security)
    await server.start()
    stream = ShardStream(f"127.0.0.1:{port}", settings.grpc_options(), security, IDENTITY)
    frame = shard_pb2.Frame(tensors=codec.encode_all([torch.randn(1, elements)]))
    try:
        for _ in range(20):
            await stream.call(frame)
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(requests):
            answer = await stream.call(frame)
            assert not answer.error.code, answer.error.message
        return (time.process_time() - cpu) * 1000 / requests, (time.perf_counter() - wall) * 1000 / requests
    finally:
        await stream.close()
        await server.stop(None)
        executor.shutdown()


def cipher_ms(size: int, repeats: int = 50) -> float:
    """CPU ms to encrypt and decrypt ``size`` bytes once with AES-128-GCM (16 KiB records, as TLS)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead, nonce, record = AESGCM(AESGCM.generate_key(bit_length=128)), bytes(12), 16384
    data = bytes(size)
    chunks = [data[i : i + record] for i in range(0, size, record)]
    start = time.process_time()
    for _ in range(repeats):
        for chunk in chunks:
            aead.decrypt(nonce, aead.encrypt(nonce, chunk, None), None)
    return (time.process_time() - start) * 1000 / repeats


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per mode (median)")
    p.add_argument("--sizes", default="4096,602112,1204224", help="activation bytes, comma-separated")
    a = p.parse_args()
    torch.set_num_threads(1)
    ca = pki.CertificateAuthority.create()
    pair = ca.issue(IDENTITY)
    modes = {
        "insecure": transport.TransportSecurity.plaintext(),
        "mTLS": transport.TransportSecurity(ca.cert_pem, pair.cert_pem, pair.key_pem),
    }
    print(f"{'bytes':>10} {'mode':>9} {'CPU ms/req':>11} {'wall ms/req':>12}")
    for size in (int(s) for s in a.sizes.split(",")):
        runs: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
        for i in range(a.rounds):  # ABBA: neither mode always goes first
            for mode, security in list(modes.items())[:: 1 if i % 2 == 0 else -1]:
                runs[mode].append(await one_hop(security, size // 4, a.requests))
        figures = {
            mode: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
            for mode, rs in runs.items()
        }
        for mode in modes:
            print(f"{size:>10} {mode:>9} {figures[mode][0]:>11.3f} {figures[mode][1]:>12.3f}")
        cpu = figures["mTLS"][0] - figures["insecure"][0]
        wall = figures["mTLS"][1] - figures["insecure"][1]
        mib = max(size / 2**20, 1e-9)
        print(
            f"{size:>10} {'mTLS adds':>9} {cpu:>11.3f} {wall:>12.3f}   ({cpu / mib:.2f} CPU ms/MiB;"
            f" the cipher alone {cipher_ms(size) / mib:.2f} ms/MiB)"
        )


if __name__ == "__main__":
    asyncio.run(main())
