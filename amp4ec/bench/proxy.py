"""A TCP forwarder that delays every chunk by a fixed time each way (netem's delay, without netem).

Run as ``python -m amp4ec.bench.proxy --listen HOST:PORT --target HOST:PORT --delay-ms D``;
it writes its bound port to ``--port-file`` and stops on SIGTERM. Standard library only (and
``amp4ec.children``), so
it starts fast and can run inside a network namespace (``ip netns exec``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
from pathlib import Path

from amp4ec.children import die_with_parent

__all__ = ["main", "serve"]

CHUNK = 64 * 1024


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Copy reader → writer, each chunk sent ``delay_s`` after it arrived, in order."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, chunk = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not chunk:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()

    sender = asyncio.create_task(send())
    try:
        while chunk := await reader.read(CHUNK):
            queue.put_nowait((loop.time() + delay_s, chunk))
    except OSError:
        pass
    queue.put_nowait((loop.time() + delay_s, b""))
    with contextlib.suppress(OSError):
        await sender


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def serve(listen: str, target: str, delay_ms: float, port_file: Path | None) -> None:
    host, port = _split(listen)
    target_host, target_port = _split(target)
    delay_s = delay_ms / 1000

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(target_host, target_port)
        except OSError:
            writer.close()
            return
        _nodelay(writer)
        _nodelay(up_writer)
        try:
            await asyncio.gather(_pipe(reader, up_writer, delay_s), _pipe(up_reader, writer, delay_s))
        finally:
            for w in (writer, up_writer):
                w.close()

    server = await asyncio.start_server(handle, host, port)
    bound = server.sockets[0].getsockname()[1]
    if port_file is not None:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(bound))
        tmp.replace(port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m amp4ec.bench.proxy", description=__doc__)
    p.add_argument("--listen", required=True, help="HOST:PORT to accept on (port 0 = any free one)")
    p.add_argument("--target", required=True, help="HOST:PORT to forward to")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added to every chunk")
    p.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    a = p.parse_args(argv)
    die_with_parent()
    asyncio.run(serve(a.listen, a.target, a.delay_ms, a.port_file))


if __name__ == "__main__":
    main()
