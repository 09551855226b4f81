"""A TCP proxy that adds a fixed one-way delay in each direction (for ``bench/wan.py``).

This kernel has no ``netem``, so ``wan.py`` shapes each simulated link's rate with ``tc``
``tbf`` and adds its latency here. The proxy runs as its own process at the far end of a
link (inside that end's network namespace), listens on the link's address and forwards to
a service on that namespace's loopback::

    client --veth (tbf)--> proxy: hold each chunk delay_ms --> 127.0.0.1:target
    client <--veth (tbf)-- proxy: hold each chunk delay_ms <-- 127.0.0.1:target

Each direction is a delay line, not stop-and-wait: a chunk read at time t is written at
t + delay while later chunks keep being read, so a round trip costs 2 x delay and the
rate is the link's. What a direction holds is bounded (``BUFFER_LIMIT``); past it the
proxy stops reading and TCP's flow control pushes back on the sender. TCP_NODELAY is set
on both sockets. Limits of the model: the TCP handshake itself is not delayed (the kernel
answers it), and TCP's congestion control sees the short veth round trip, not the
simulated one.

Usage: ``python bench/delay_proxy.py --listen 10.231.1.2:5672 --target 127.0.0.1:5672
--delay-ms 10 [--ready-file PATH]``. Runs until SIGTERM or SIGINT; the ready file is
written once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
from collections import deque
from pathlib import Path
from typing import Final

CHUNK: Final = 256 * 1024
BUFFER_LIMIT: Final = 4 * 1024 * 1024  # bytes held per direction before reading pauses
CONNECT_TIMEOUT_S: Final = 10.0


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _delay_line(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float
) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay_s`` after it was read; EOF too."""
    loop = asyncio.get_running_loop()
    line: deque[tuple[float, bytes]] = deque()  # (when due, chunk); b"" is EOF
    arrived = asyncio.Event()
    room = asyncio.Event()
    room.set()
    held = 0

    async def receive() -> None:
        nonlocal held
        while True:
            await room.wait()
            data = await reader.read(CHUNK)
            line.append((loop.time() + delay_s, data))
            arrived.set()
            if not data:
                return
            held += len(data)
            if held >= BUFFER_LIMIT:
                room.clear()

    async def forward() -> None:
        nonlocal held
        while True:
            while not line:
                arrived.clear()
                await arrived.wait()
            pause = line[0][0] - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            # Everything due by now goes out in one write, in order.
            now, eof = loop.time(), False
            batch: list[bytes] = []
            while line and line[0][0] <= now:
                data = line.popleft()[1]
                if not data:
                    eof = True
                    break
                batch.append(data)
            if batch:
                payload = b"".join(batch)
                writer.write(payload)
                await writer.drain()
                held -= len(payload)
                if held < BUFFER_LIMIT:
                    room.set()
            if eof:  # pass the half-close on
                if writer.can_write_eof():
                    writer.write_eof()
                return

    async with asyncio.TaskGroup() as group:
        group.create_task(receive())
        group.create_task(forward())


async def _serve_connection(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    *,
    target: tuple[str, int],
    delay_s: float,
) -> None:
    try:
        upstream_reader, upstream_writer = await asyncio.wait_for(
            asyncio.open_connection(*target), CONNECT_TIMEOUT_S
        )
    except (OSError, TimeoutError):
        client_writer.close()
        return
    _nodelay(client_writer)
    _nodelay(upstream_writer)
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(_delay_line(client_reader, upstream_writer, delay_s))
            group.create_task(_delay_line(upstream_reader, client_writer, delay_s))
    except* (ConnectionError, OSError):
        pass  # one side reset or went away: the other is closed below
    finally:
        for writer in (client_writer, upstream_writer):
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


async def serve(
    listen: tuple[str, int], target: tuple[str, int], delay_s: float, ready_file: Path | None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    connections: set[asyncio.Task[None]] = set()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections.add(task)
        try:
            await _serve_connection(reader, writer, target=target, delay_s=delay_s)
        finally:
            connections.discard(task)

    server = await asyncio.start_server(on_client, *listen, reuse_address=True, backlog=64)
    if ready_file is not None:
        await asyncio.to_thread(ready_file.write_text, f"{listen[0]}:{listen[1]}\n", "ascii")
    async with server:
        await stop.wait()
        server.close()
        for task in list(connections):
            task.cancel()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT to accept on")
    parser.add_argument("--target", type=_address, required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay, each way")
    parser.add_argument("--ready-file", type=Path, help="written once listening")
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.target, args.delay_ms / 1000, args.ready_file))


if __name__ == "__main__":
    main()
