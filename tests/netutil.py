"""Loopback helpers for the proxy edge tests: connected socket pairs, small TCP servers
(echo with half-close, banner), a byte-counting metrics object and a tiny forwarder built
from classify + forward_opaque."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from shoal.proxy.accept import Classified, classify, connect_tcp
from shoal.proxy.opaque import forward_opaque

LOOPBACK = "127.0.0.1"
IO_TIMEOUT = 30.0  # every wait in these helpers is bounded; tests pass in well under it
CHUNK = 256 * 1024


@dataclass
class Counters:
    """A TcpMetrics-like object that remembers what forward_opaque reported."""

    read_bytes: int = 0
    written_bytes: int = 0
    closes: list[bool] = field(default_factory=list)

    def read(self, n: int) -> None:
        self.read_bytes += n

    def wrote(self, n: int) -> None:
        self.written_bytes += n

    def closed(self, error: bool) -> None:
        self.closes.append(error)


def listener() -> socket.socket:
    sock = socket.create_server((LOOPBACK, 0))
    sock.setblocking(False)
    return sock


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


async def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(outside, accepted): a connected loopback pair, both non-blocking. The outside end
    plays the client, the accepted end is what a proxy's listener would get."""
    loop = asyncio.get_running_loop()
    with listener() as server:
        outside = await connect_tcp(loop, LOOPBACK, port_of(server), IO_TIMEOUT)
        async with asyncio.timeout(IO_TIMEOUT):
            accepted, _ = await loop.sock_accept(server)
    accepted.setblocking(False)
    return outside, accepted


def reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def recv_all(sock: socket.socket, limit: int = 1 << 31) -> bytes:
    """Everything until EOF (bounded by IO_TIMEOUT and ``limit`` bytes)."""
    loop = asyncio.get_running_loop()
    out = bytearray()
    async with asyncio.timeout(IO_TIMEOUT):
        while len(out) < limit:
            data = await loop.sock_recv(sock, CHUNK)
            if not data:
                break
            out += data
    return bytes(out)


async def recv_exactly(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    async with asyncio.timeout(IO_TIMEOUT):
        while len(out) < size:
            data = await loop.sock_recv(sock, size - len(out))
            if not data:
                raise EOFError(f"EOF after {len(out)} of {size} bytes")
            out += data
    return bytes(out)


async def send_all(sock: socket.socket, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(IO_TIMEOUT):
        await loop.sock_sendall(sock, data)


async def hash_stream(sock: socket.socket, size: int) -> str:
    """sha256 of exactly ``size`` bytes then EOF (fails on more or fewer)."""
    loop = asyncio.get_running_loop()
    digest = hashlib.sha256()
    got = 0
    buffer = bytearray(CHUNK)
    async with asyncio.timeout(IO_TIMEOUT):
        while True:
            n = await loop.sock_recv_into(sock, buffer)
            if n == 0:
                break
            digest.update(memoryview(buffer)[:n])
            got += n
    assert got == size, f"received {got} bytes, expected {size}"
    return digest.hexdigest()


Handler = Callable[[socket.socket], Awaitable[None]]


@contextlib.asynccontextmanager
async def tcp_server(handler: Handler) -> AsyncIterator[int]:
    """A loopback server running ``handler`` on each accepted (non-blocking) socket; yields
    its port. Handlers are cancelled and their sockets closed on exit."""
    loop = asyncio.get_running_loop()
    server = listener()
    tasks: set[asyncio.Task[None]] = set()

    async def run(sock: socket.socket) -> None:
        with sock:
            await handler(sock)

    async def accept_loop() -> None:
        while True:
            sock, _ = await loop.sock_accept(server)
            sock.setblocking(False)
            task = loop.create_task(run(sock))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    acceptor = loop.create_task(accept_loop())
    try:
        yield port_of(server)
    finally:
        acceptor.cancel()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(acceptor, *tasks, return_exceptions=True)
        server.close()


async def echo(sock: socket.socket) -> None:
    """Echo every byte; on EOF shut down the write side (half-close) after the last one."""
    loop = asyncio.get_running_loop()
    buffer = bytearray(CHUNK)
    while True:
        n = await loop.sock_recv_into(sock, buffer)
        if n == 0:
            break
        await loop.sock_sendall(sock, memoryview(buffer)[:n])
    sock.shutdown(socket.SHUT_WR)


def banner(text: bytes) -> Handler:
    """A server that speaks first, then echoes."""

    async def handle(sock: socket.socket) -> None:
        await asyncio.get_running_loop().sock_sendall(sock, text)
        await echo(sock)

    return handle


async def silent(sock: socket.socket) -> None:
    """A server that says nothing and waits for the client's EOF."""
    await recv_all(sock)


@contextlib.asynccontextmanager
async def forwarder(
    upstream_port: int,
    *,
    timeout: float,
    opaque: bool = False,
    results: list[Classified] | None = None,
) -> AsyncIterator[int]:
    """A tiny loopback TCP proxy: accept, classify with an eager upstream connector, then
    forward_opaque whatever the protocol (enough for opaque-protocol tests)."""
    loop = asyncio.get_running_loop()

    async def connector() -> socket.socket:
        return await connect_tcp(loop, LOOPBACK, upstream_port, 1.0)

    async def handle(client: socket.socket) -> None:
        found = await classify(loop, client, opaque=opaque, connect_upstream=connector,
                               timeout=timeout)
        if results is not None:
            results.append(found)
        if found.upstream is None:
            return
        await forward_opaque(client, found.upstream, found.client_data, None,
                             upstream_initial=found.upstream_data)

    async with tcp_server(handle) as port:
        yield port
