"""The HTTP/1 engine in-process: the ServerProtocol on a real loopback listener, upstreams
that misbehave on purpose (scripted raw servers), and a fake transport for the pure
adapter cases. Errors are checked as the client sees them."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from shoal.proxy.config import DirectionSettings, Http1Settings, ServiceName
from shoal.proxy.http1.client import Pool
from shoal.proxy.http1.server import Connections, ServerContext, ServerProtocol
from shoal.proxy.metrics import ProxyMetrics
from shoal.proxy.outbound import OutboundRouter, Services, StaticEntry
from shoal.proxy.route import FixedRouter, FixedTarget, NullRequestCounter, NullTcpCounter

from .apps import LOOPBACK, free_port

IO_TIMEOUT = 10.0
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@dataclass
class Upstream:
    """A raw upstream whose behaviour per connection (numbered from 0) is a script."""

    script: Script
    port: int = 0
    connections: int = 0
    server: asyncio.Server | None = None

    async def start(self) -> Upstream:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            index = self.connections
            self.connections += 1
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self.script(reader, writer, index)
            writer.close()

        self.server = await asyncio.start_server(serve, LOOPBACK, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def answer_ok_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            index: int) -> None:
    while True:
        await read_head(reader)
        writer.write(OK)
        await writer.drain()


@dataclass
class Front:
    """The proxy's HTTP/1 front end on a loopback port, routing to a fixed upstream (or,
    with ``static``, to a balanced static service)."""

    settings: Http1Settings = field(default_factory=Http1Settings)
    connections: Connections = field(default_factory=Connections)
    port: int = 0
    pool: Pool | None = None
    server: asyncio.Server | None = None

    async def start(self, upstream_port: int | None = None,
                    static: list[tuple[str, int]] | None = None) -> Front:
        self.pool = Pool(max_idle=8, idle_timeout=3.0, max_head_bytes=64 * 1024)
        if static is not None:
            name = ServiceName("t", "svc")
            services = Services(discovery=None, static={name: StaticEntry(name, static)},
                                pool=self.pool, metrics=ProxyMetrics(),
                                settings=DirectionSettings(0.5, 0.5), cluster_domain="c.l")
            router: OutboundRouter | FixedRouter = OutboundRouter(services, "t")
        else:
            assert upstream_port is not None
            target = FixedTarget(LOOPBACK, upstream_port, self.pool, NullRequestCounter(), 0.5)
            router = FixedRouter(target)
        ctx = ServerContext(router, self.settings, NullTcpCounter(), self.connections)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: ServerProtocol(ctx), LOOPBACK, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.connections.close_all()
        if self.pool is not None:
            self.pool.close_all()


@pytest.fixture
async def ok_upstream() -> AsyncIterator[Upstream]:
    upstream = await Upstream(answer_ok_forever).start()
    yield upstream
    upstream.close()


async def exchange(port: int, data: bytes, *, half_close: bool = True) -> bytes:
    """Send ``data``, optionally half-close, and read until the proxy closes."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(data)
        if half_close:
            writer.write_eof()
        async with asyncio.timeout(IO_TIMEOUT):
            return await reader.read()
    finally:
        writer.close()


def statuses(raw: bytes) -> list[int]:
    """Status codes of the responses in ``raw`` (bodies here never contain "HTTP/1.1 ")."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


async def test_malformed_request_gets_400(ok_upstream: Upstream) -> None:
    front = await Front().start(ok_upstream.port)
    try:
        raw = await exchange(front.port, b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")
        assert statuses(raw) == [400]
        assert b"shoal-proxy-error: malformed request" in raw
        assert b"connection: close" in raw
    finally:
        front.close()


async def test_limits_431_and_414(ok_upstream: Upstream) -> None:
    front = await Front(Http1Settings(max_request_head_bytes=2048, max_headers=10,
                                      max_request_target_bytes=256)).start(ok_upstream.port)
    try:
        big = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 4000 + b"\r\n\r\n"
        assert statuses(await exchange(front.port, big)) == [431]
        many = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(
            b"X-%d: 1\r\n" % i for i in range(20)) + b"\r\n"
        assert statuses(await exchange(front.port, many)) == [431]
        long_target = b"GET /" + b"a" * 600 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
        assert statuses(await exchange(front.port, long_target)) == [414]
        # A head that never ends but grows past the limit is refused before it ends.
        endless = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Y: z\r\n" * 300
        assert statuses(await exchange(front.port, endless)) == [431]
        assert ok_upstream.connections == 0
    finally:
        front.close()


async def test_pipelined_then_malformed_answers_in_order(ok_upstream: Upstream) -> None:
    front = await Front().start(ok_upstream.port)
    try:
        raw = await exchange(front.port, b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
                                         b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
                                         b"NOT HTTP AT ALL\r\n\r\n")
        assert statuses(raw) == [200, 200, 400]
    finally:
        front.close()


async def test_upstream_refused_is_502_and_other_endpoint_is_tried(
        ok_upstream: Upstream) -> None:
    dead = free_port()
    front = await Front().start(dead)
    try:
        raw = await exchange(front.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert statuses(raw) == [502]
        assert b"shoal-proxy-error: connecting to 127.0.0.1:%d failed" % dead in raw
    finally:
        front.close()
    balanced = await Front().start(static=[(LOOPBACK, dead), (LOOPBACK, ok_upstream.port)])
    try:
        for _ in range(6):  # whichever endpoint P2C picks first, the request succeeds
            raw = await exchange(balanced.port, b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
            assert statuses(raw) == [200]
    finally:
        balanced.close()


async def test_response_timeout_is_504() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     index: int) -> None:
        await read_head(reader)
        await asyncio.sleep(IO_TIMEOUT)

    upstream = await Upstream(silent).start()
    front = await Front(Http1Settings(response_timeout=0.2)).start(upstream.port)
    try:
        task = asyncio.create_task(exchange(front.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"))
        await asyncio.sleep(0.4)
        front.connections.sweep(time.monotonic())  # the once-a-second sweeper, now
        raw = await task
        assert statuses(raw) == [504]
        assert b"no response within 0.2s" in raw
    finally:
        front.close()
        upstream.close()


async def test_request_head_timeout_is_408(ok_upstream: Upstream) -> None:
    front = await Front(Http1Settings(request_head_timeout=0.1)).start(ok_upstream.port)
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, front.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n")  # and then nothing
        await asyncio.sleep(0.05)
        front.connections.sweep(time.monotonic())  # first sighting
        await asyncio.sleep(0.15)
        front.connections.sweep(time.monotonic())
        async with asyncio.timeout(IO_TIMEOUT):
            raw = await reader.read()
        writer.close()
        assert statuses(raw) == [408]
    finally:
        front.close()


async def test_upstream_closing_early_or_mid_body() -> None:
    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     index: int) -> None:
        head = await read_head(reader)
        if b"/cut" in head:  # promise 1000 bytes, send 10, go away
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            await writer.drain()
        elif b"/garbage" in head:
            writer.write(b"SMTP ready\r\n")
            await writer.drain()
        # "/reset": close without a byte

    upstream = await Upstream(behave).start()
    front = await Front().start(upstream.port)
    try:
        raw = await exchange(front.port, b"GET /reset HTTP/1.1\r\nHost: a\r\n\r\n")
        assert statuses(raw) == [502] and b"closed the connection" in raw
        raw = await exchange(front.port, b"GET /garbage HTTP/1.1\r\nHost: a\r\n\r\n")
        assert statuses(raw) == [502] and b"malformed response" in raw
        raw = await exchange(front.port, b"GET /cut HTTP/1.1\r\nHost: a\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"0123456789")  # cut short
    finally:
        front.close()
        upstream.close()


async def test_stale_pooled_connection_is_retried_for_idempotent_requests() -> None:
    async def flaky(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    index: int) -> None:
        await read_head(reader)
        writer.write(OK)
        await writer.drain()
        if index == 0:  # keep-alive promised, but the next request finds it closing
            await read_head(reader)
            return
        await answer_ok_forever(reader, writer, index)

    upstream = await Upstream(flaky).start()
    front = await Front().start(upstream.port)
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, front.port)
        for _ in range(3):
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            async with asyncio.timeout(IO_TIMEOUT):
                assert await reader.readexactly(len(OK)) == OK
        writer.close()
        assert upstream.connections == 2
    finally:
        front.close()
        upstream.close()


async def test_http10_client_gets_close_delimited_body_from_chunked_upstream() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      index: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(IO_TIMEOUT)

    upstream = await Upstream(chunked).start()
    front = await Front().start(upstream.port)
    try:
        raw = await exchange(front.port, b"GET / HTTP/1.0\r\n\r\n", half_close=False)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b"Transfer-Encoding" not in head and b"Connection: close" in head
        assert body == b"hello world"
    finally:
        front.close()
        upstream.close()


async def test_slow_reader_bounds_what_the_proxy_buffers() -> None:
    total = 32 * 1024 * 1024

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  index: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"x" * (1024 * 1024)
        for _ in range(32):
            writer.write(block)
            await writer.drain()

    upstream = await Upstream(big).start()
    front = await Front().start(upstream.port)
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, front.port, limit=1024)
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        received, peak = 0, 0
        async with asyncio.timeout(60):
            while received < total + 30:
                data = await reader.read(16 * 1024)
                assert data
                received += len(data)
                for conn in front.connections.live:
                    peak = max(peak, conn.transport.get_write_buffer_size())
                await asyncio.sleep(0.0005 if received < 2 * 1024 * 1024 else 0)
        writer.close()
        # One high-water mark plus at most one upstream read beyond it, never the body.
        assert 0 < peak < 64 * 1024 + 512 * 1024, peak
    finally:
        front.close()
        upstream.close()


def test_fake_transport_pipelining_and_close() -> None:
    """The adapter on a fake transport: two pipelined requests to an unknown service
    are answered in order, each with the error header, and the connection stays open."""

    class FakeTransport:
        def __init__(self) -> None:
            self.data = bytearray()
            self.closed = False
            self.paused = False

        def write(self, data: bytes) -> None:
            self.data += data

        def is_closing(self) -> bool:
            return self.closed

        def close(self) -> None:
            self.closed = True

        abort = close

        def set_write_buffer_limits(self, high: int, low: int) -> None:
            pass

        def pause_reading(self) -> None:
            self.paused = True

        def resume_reading(self) -> None:
            self.paused = False

    async def run() -> None:
        services = Services(discovery=None, static={}, pool=Pool(
            max_idle=1, idle_timeout=1, max_head_bytes=1024), metrics=ProxyMetrics(),
            settings=DirectionSettings(0.1, 0.1), cluster_domain="cluster.local")
        ctx = ServerContext(OutboundRouter(services, "ns"), Http1Settings(),
                            NullTcpCounter(), Connections())
        protocol = ServerProtocol(ctx)
        transport = FakeTransport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nHEAD / HTTP/1.1\r\n"
                               b"Host: b.x:80\r\n\r\n")
        assert statuses(bytes(transport.data)) == [503, 503]
        assert bytes(transport.data).count(b"shoal-proxy-error: unknown service") == 2
        assert not transport.closed and not transport.paused
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert transport.closed

    asyncio.run(run())
