"""Streamed responses of the shared HTTP server (kernel/httpserve.py) over real sockets:
chunked framing, the producer cancelled and cleaned up when the peer leaves or the
server stops, HEAD sending only the head, and plain requests still answered."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from shoal.kernel.httpserve import HttpServer, Request, Response, Send, StreamResponse

WAIT_SECONDS = 5.0


class Producer:
    def __init__(self, pieces: list[bytes], forever: bool) -> None:
        self.pieces = pieces
        self.forever = forever
        self.cleaned = asyncio.Event()

    async def __call__(self, send: Send) -> None:
        try:
            for piece in self.pieces:
                await send(piece)
            if self.forever:
                await asyncio.Event().wait()
        finally:
            self.cleaned.set()


@contextlib.asynccontextmanager
async def serving(producer: Producer) -> AsyncIterator[tuple[HttpServer, int]]:
    async def handler(request: Request) -> Response | StreamResponse:
        if request.path == "/plain":
            return Response(200, b"plain")
        return StreamResponse(200, producer)

    server = HttpServer(handler, name="test")
    port = await server.start("127.0.0.1", 0)
    try:
        yield server, port
    finally:
        await server.stop()


async def _request(port: int, method: str = "GET", path: str = "/stream",
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def test_stream_is_chunked_and_ends_with_the_producer() -> None:
    producer = Producer([b"event: a\n\n", b"", b"event: b\n\n"], forever=False)
    async with serving(producer) as (_, port):
        reader, writer = await _request(port)
        data = await asyncio.wait_for(reader.read(), WAIT_SECONDS)  # to EOF
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Transfer-Encoding: chunked" in head and b"Connection: close" in head
    assert b"Content-Length" not in head
    # an empty piece is not a chunk (it would end the body)
    assert body == b"a\r\nevent: a\n\n\r\na\r\nevent: b\n\n\r\n0\r\n\r\n"


async def test_peer_leaving_cancels_the_producer() -> None:
    producer = Producer([b"hello"], forever=True)
    async with serving(producer) as (_, port):
        reader, writer = await _request(port)
        await asyncio.wait_for(reader.readuntil(b"hello\r\n"), WAIT_SECONDS)
        assert not producer.cleaned.is_set()
        writer.close()
        await asyncio.wait_for(producer.cleaned.wait(), WAIT_SECONDS)
        # the server still answers plain requests afterwards
        reader, writer = await _request(port, path="/plain")
        answer = await asyncio.wait_for(reader.readuntil(b"plain"), WAIT_SECONDS)
        assert answer.startswith(b"HTTP/1.1 200 OK")
        writer.close()


async def test_stop_cuts_open_streams() -> None:
    producer = Producer([b"hello"], forever=True)
    async with serving(producer) as (server, port):
        reader, writer = await _request(port)
        await asyncio.wait_for(reader.readuntil(b"hello\r\n"), WAIT_SECONDS)
        await asyncio.wait_for(server.stop(), WAIT_SECONDS)
        assert producer.cleaned.is_set()
        rest = await asyncio.wait_for(reader.read(), WAIT_SECONDS)
        assert rest == b""  # the connection was closed
        writer.close()


async def test_head_of_a_stream_sends_only_the_head() -> None:
    producer = Producer([b"never"], forever=True)
    async with serving(producer) as (_, port):
        reader, writer = await _request(port, method="HEAD")
        data = await asyncio.wait_for(reader.read(), WAIT_SECONDS)
        writer.close()
    assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"\r\n\r\n")
    assert not producer.cleaned.is_set()  # never started
