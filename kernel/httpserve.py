"""A small HTTP/1.1 server on asyncio streams and httptools, shared by the demo's web
service and the dashboard: GET and HEAD (a body, if sent, is read and ignored),
keep-alive, pipelined requests answered in order, bounded heads and bodies, timeouts,
streamed responses (server-sent events) and a graceful stop.

Handlers are ``async (Request) -> Response | StreamResponse``; each connection is its own
task, so a slow handler never holds up another connection. Anything the parser rejects
gets a 4xx and the connection is closed; a handler that raises gets a 500 with a JSON
error and the server carries on. A ``StreamResponse`` is sent with chunked encoding and
ends the connection when its producer returns; the producer is cancelled as soon as the
peer goes away (its ``finally`` is where it lets go of what it holds). There is no TLS:
both users listen on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, unquote

import httptools

log = logging.getLogger("shoal.http")

# A request head (request line and headers) larger than this is refused with 431.
# 16 KiB is twice what browsers send with cookies and matches common servers' limits
# (nginx's large_client_header_buffers is 4 x 8 KiB, Node's max header size 16 KiB).
MAX_HEAD_BYTES = 16 * 1024
# Request bodies are ignored by every route; anything past this is refused with 413.
MAX_BODY_BYTES = 64 * 1024
# Bytes asked of the socket per read: a whole request head in one read in practice.
READ_CHUNK_BYTES = 64 * 1024
# A keep-alive connection with no request in progress is closed after this long
# (browsers keep idle connections for about 5 minutes; 30 s frees our side sooner).
IDLE_TIMEOUT_SECONDS = 30.0
# A request whose head or body stops arriving part-way is dropped after this long.
READ_TIMEOUT_SECONDS = 10.0
# A handler gets this long to answer (a stream: to start); web's gRPC calls have 5 s
# deadlines and the dashboard's bus requests 5 s timeouts, so this fires only on a bug,
# and the client then gets a 504 instead of a hang.
HANDLER_TIMEOUT_SECONDS = 15.0
# Writes wait this long for the peer to take our bytes (a stalled reader).
WRITE_TIMEOUT_SECONDS = 10.0
# Requests parsed ahead of the one being answered (pipelining); past this the peer gets
# 429 and the connection is closed: no real client pipelines deeper than a handful.
MAX_PIPELINED_REQUESTS = 16
# Connections served at once; one more is answered 503 and closed. Below the usual 1024
# soft limit on open files, and far beyond what the demo's traffic (a bot at 1 round/s, a
# browser, a benchmark's few dozen connections) opens.
MAX_CONNECTIONS = 1000
# On stop, requests in progress get this long to finish before connections are cut
# (streams are not waited for: they would run forever).
STOP_GRACE_SECONDS = 2.0
# What a peer may send while it receives a stream (it should send nothing): past this
# the stream ends. One more request head's worth.
MAX_BYTES_DURING_STREAM = MAX_HEAD_BYTES


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names; a repeated header keeps the last value
    keep_alive: bool

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


Send = Callable[[bytes], Awaitable[None]]


@dataclass(frozen=True)
class StreamResponse:
    """A response whose body ``produce(send)`` writes piece by piece until it returns.

    ``send`` raises ``ConnectionError`` or ``TimeoutError`` when the peer is gone or
    stalled; the producer is cancelled when the peer closes its side.
    """

    status: int
    produce: Callable[[Send], Awaitable[None]]
    content_type: str = "text/event-stream; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Response | StreamResponse]]


def json_response(status: int, value: object) -> Response:
    body = json.dumps(value, ensure_ascii=False).encode()
    return Response(status, body, "application/json; charset=utf-8")


def error_response(status: int, message: str) -> Response:
    """The JSON error body emojivoto's web writes: ``{"error": "..."}``."""
    return json_response(status, {"error": message})


def render(response: Response, keep_alive: bool, head_only: bool) -> bytes:
    """The bytes of a response: head and body in one buffer, so one write."""
    reason = HTTPStatus(response.status).phrase
    lines = [f"HTTP/1.1 {response.status} {reason}",
             f"Content-Type: {response.content_type}",
             f"Content-Length: {len(response.body)}",
             f"Connection: {'keep-alive' if keep_alive else 'close'}"]
    lines += [f"{name}: {value}" for name, value in response.headers]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


def render_stream_head(response: StreamResponse) -> bytes:
    reason = HTTPStatus(response.status).phrase
    lines = [f"HTTP/1.1 {response.status} {reason}",
             f"Content-Type: {response.content_type}",
             "Transfer-Encoding: chunked",
             "Cache-Control: no-store",
             "Connection: close"]
    lines += [f"{name}: {value}" for name, value in response.headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 section 7.1); empty data is the last one."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class RequestTooLarge(Exception):
    """The peer sent a head or body over our limits; ``status`` is what it will see."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@dataclass
class _Collector:
    """httptools callbacks: gathers each complete request into ``ready``."""

    ready: deque[Request] = field(default_factory=deque)
    parser: httptools.HttpRequestParser | None = None
    url: bytearray = field(default_factory=bytearray)
    headers: dict[str, str] = field(default_factory=dict)
    head_bytes: int = 0
    body_bytes: int = 0
    in_message: bool = False

    def on_message_begin(self) -> None:
        self.url.clear()
        self.headers = {}
        self.head_bytes = self.body_bytes = 0
        self.in_message = True

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > MAX_BODY_BYTES:
            raise RequestTooLarge(413)

    def on_message_complete(self) -> None:
        assert self.parser is not None
        parsed = httptools.parse_url(bytes(self.url))
        path = unquote(parsed.path.decode("latin-1")) if parsed.path else "/"
        query = parse_qs(parsed.query.decode("latin-1")) if parsed.query else {}
        self.ready.append(Request(
            method=self.parser.get_method().decode("latin-1"),
            path=path, query=query, headers=self.headers,
            keep_alive=bool(self.parser.should_keep_alive())))
        self.in_message = False
        if len(self.ready) > MAX_PIPELINED_REQUESTS:
            raise RequestTooLarge(429)

    def _count_head(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > MAX_HEAD_BYTES:
            raise RequestTooLarge(431)


class HttpServer:
    """Serves ``handler`` on one address until ``stop()``."""

    def __init__(self, handler: Handler, name: str = "http") -> None:
        self._handler = handler
        self._name = name
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._busy: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        self._server = await asyncio.start_server(self._accept, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting, let requests in progress finish (bounded), close the rest."""
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_GRACE_SECONDS
        while self._busy and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=STOP_GRACE_SECONDS)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), STOP_GRACE_SECONDS)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= MAX_CONNECTIONS:
            with contextlib.suppress(Exception):
                await self._write(writer, render(
                    error_response(503, "too many connections"), False, False))
            writer.close()
            return
        self._connections.add(task)
        try:
            await self._serve(reader, writer, task)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the peer went away or stalled; nothing to answer
        except asyncio.CancelledError:
            # stop() cut the connection. Ending the task normally matters: asyncio (3.11)
            # calls exception() on a cancelled connection task and logs the error.
            pass
        finally:
            self._connections.discard(task)
            self._busy.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), WRITE_TIMEOUT_SECONDS)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     task: asyncio.Task[None]) -> None:
        collector = _Collector()
        parser = httptools.HttpRequestParser(collector)
        collector.parser = parser
        while True:
            if not collector.ready:
                timeout = READ_TIMEOUT_SECONDS if collector.in_message else IDLE_TIMEOUT_SECONDS
                data = await asyncio.wait_for(reader.read(READ_CHUNK_BYTES), timeout)
                if not data:
                    return
                status = self._feed(parser, data)
                if status is not None:
                    await self._write(writer, render(
                        error_response(status, HTTPStatus(status).phrase), False, False))
                    return
                continue
            request = collector.ready.popleft()
            self._busy.add(task)
            try:
                response = await self._respond(request)
                if isinstance(response, StreamResponse):
                    self._busy.discard(task)  # a stream may run for hours: stop cuts it
                    await self._stream(reader, writer, request, response)
                    return
                await self._write(writer, render(response, request.keep_alive,
                                                 request.method == "HEAD"))
            finally:
                self._busy.discard(task)
            if not request.keep_alive:
                return

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      request: Request, response: StreamResponse) -> None:
        """Send a streamed body until the producer returns or the peer goes away."""
        await self._write(writer, render_stream_head(response))
        if request.method == "HEAD":
            return

        async def send(data: bytes) -> None:
            if data:
                await self._write(writer, chunk(data))

        producer = asyncio.ensure_future(response.produce(send))
        watcher = asyncio.ensure_future(self._until_peer_leaves(reader))
        try:
            await asyncio.wait((producer, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for future in (producer, watcher):
                future.cancel()
            # the producer's cleanup (closing what it opened) runs here, bounded
            await asyncio.wait((producer, watcher), timeout=STOP_GRACE_SECONDS)
        if producer.done() and not producer.cancelled() and producer.exception() is None:
            await self._write(writer, chunk(b""))
        elif producer.done() and not producer.cancelled():
            error = producer.exception()
            if not isinstance(error, ConnectionError | TimeoutError):
                log.error("%s %s %s: stream failed: %r", self._name, request.method,
                          request.path, error)

    @staticmethod
    async def _until_peer_leaves(reader: asyncio.StreamReader) -> None:
        """Returns when the peer closes its side (or sends more than a stream allows)."""
        received = 0
        while received <= MAX_BYTES_DURING_STREAM:
            data = await reader.read(READ_CHUNK_BYTES)
            if not data:
                return
            received += len(data)

    @staticmethod
    def _feed(parser: httptools.HttpRequestParser, data: bytes) -> int | None:
        """Feed bytes to the parser; a status to answer before closing, or None."""
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            return 501  # no WebSocket or h2c upgrade here
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            return cause.status if isinstance(cause, RequestTooLarge) else 400
        except httptools.HttpParserError:
            return 400
        return None

    async def _respond(self, request: Request) -> Response | StreamResponse:
        try:
            return await asyncio.wait_for(self._handler(request), HANDLER_TIMEOUT_SECONDS)
        except TimeoutError:
            log.warning("%s %s %s: handler timed out", self._name, request.method, request.path)
            return error_response(504, "the handler timed out")
        except Exception as error:  # one bad request must not take the server down
            log.exception("%s %s %s failed", self._name, request.method, request.path)
            return error_response(500, f"internal error: {type(error).__name__}")

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_SECONDS)
