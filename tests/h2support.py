"""Tier-2 helpers for the HTTP/2 engine: a fake transport to drive a client connection
with bytes, an in-loop HTTP/2 upstream built on the h2 library (independent of the
engine's codec wrapper), and an h2 client codec to read what the proxy wrote."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from shoal.proxy.config import Http1Settings, Http2Settings
from shoal.proxy.http1.client import Pool
from shoal.proxy.http1.server import Connections
from shoal.proxy.http2.client import H2Pool
from shoal.proxy.http2.conn import Flusher
from shoal.proxy.http2.server import FixedH2Router, H2Context, ServerConnection
from shoal.proxy.route import FixedTarget, NullRequestCounter, NullTcpCounter

LOOPBACK = "127.0.0.1"
BIG_BODY = 2 * 1024 * 1024  # what /big sends, far above every window on the path
SLOW_SECONDS = 0.3  # how long /slow waits before answering


class FakeTransport(asyncio.Transport):
    """Records writes; close and abort end the connection on the next loop turn."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.out = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        if not self.closed:
            self.out += data

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class Upstream(asyncio.Protocol):
    """An h2 server: ``/big`` streams BIG_BODY bytes as flow control allows, ``/slow``
    answers after SLOW_SECONDS, anything else answers "ok" at once."""

    def __init__(self, stats: dict[str, int]) -> None:
        self.stats = stats
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8"))
        self.pending: dict[int, int] = {}  # stream -> bytes of /big still to send

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.conn.initiate_connection()
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()
            self.transport.close()
            return
        for event in events:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._event(event)
        self._flush()

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self.stats["requests"] = self.stats.get("requests", 0) + 1
            path = {str(k): str(v) for k, v in event.headers}.get(":path", "")
            if path == "/big":
                self.conn.send_headers(event.stream_id, [(":status", "200")])
                self.pending[event.stream_id] = BIG_BODY
                self._send_big(event.stream_id)
            elif path == "/slow":
                asyncio.get_running_loop().call_later(SLOW_SECONDS, self._answer,
                                                      event.stream_id)
            else:
                self._answer(event.stream_id)
        elif isinstance(event, h2.events.DataReceived):
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.WindowUpdated):
            for stream_id in list(self.pending):
                self._send_big(stream_id)

    def _answer(self, stream_id: int) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.send_headers(stream_id, [(":status", "200"), ("x-backend", "up")])
            self.conn.send_data(stream_id, b"ok", end_stream=True)
        self._flush()

    def _send_big(self, stream_id: int) -> None:
        left = self.pending[stream_id]
        while left:
            size = min(left, self.conn.local_flow_control_window(stream_id),
                       self.conn.max_outbound_frame_size)
            if size <= 0:
                break
            left -= size
            self.conn.send_data(stream_id, b"x" * size, end_stream=not left)
            self.stats["sent"] = self.stats.get("sent", 0) + size
        self.pending[stream_id] = left
        if not left:
            del self.pending[stream_id]


@contextlib.asynccontextmanager
async def upstream_server(stats: dict[str, int]) -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Upstream(stats), LOOPBACK, 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


def context(port: int, http2: Http2Settings | None = None) -> H2Context:
    """What a ServerConnection needs, routing everything to ``port``."""
    pool = H2Pool(http2 or Http2Settings(), Flusher())
    target = FixedTarget(LOOPBACK, port, Pool(max_idle=1, idle_timeout=1.0,
                                              max_head_bytes=65536),
                         NullRequestCounter(), connect_timeout=1.0)
    return H2Context(router=FixedH2Router(target), pool=pool, http1=Http1Settings(),
                     tcp=NullTcpCounter(), connections=Connections())


def serve(ctx: H2Context) -> tuple[ServerConnection, FakeTransport]:
    conn = ServerConnection(ctx)
    transport = FakeTransport(conn)
    conn.connection_made(transport)
    return conn, transport


class Client:
    """An h2 client codec to write requests and read what the proxy sent back."""

    def __init__(self) -> None:
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.events: list[h2.events.Event] = []

    def request(self, path: str, end_stream: bool = True) -> int:
        stream_id = int(self.conn.get_next_available_stream_id())
        self.conn.send_headers(stream_id, [(":method", "GET"), (":scheme", "http"),
                                           (":path", path), (":authority", "up")],
                               end_stream=end_stream)
        return stream_id

    def take(self) -> bytes:
        return bytes(self.conn.data_to_send())

    def read(self, transport: FakeTransport, ack: bool = True) -> list[h2.events.Event]:
        data = bytes(transport.out)
        transport.out.clear()
        events = self.conn.receive_data(data) if data else []
        for event in events:
            if ack and isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                    event.stream_id)
        self.events += events
        return events
