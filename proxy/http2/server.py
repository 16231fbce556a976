"""The downstream side of the HTTP/2 engine: one ``ServerConnection`` per client
connection (h2c with prior knowledge, HTTP/2 inside a CONNECT tunnel, or over TLS), each
request stream becoming an ``Exchange`` (exchange.py) routed and balanced on its own.

Connection rules:
* Requests are routed per stream by the room's ``H2Router`` (the authority on the
  outbound port, a fixed target elsewhere) and balanced per request, so the streams of
  one client connection spread over every endpoint.
* A malformed request head (headers.py) resets its stream (PROTOCOL_ERROR); a protocol
  error on the connection gets a GOAWAY with its code (codec.CodecError), then the
  connection closes and every upstream stream it had is cancelled.
* PING and SETTINGS are acknowledged by the codec; the peer's SETTINGS (windows, frame
  size, stream limit) are respected when sending.
* Drain (shutdown): GOAWAY(NO_ERROR, last stream id), new streams refused
  (REFUSED_STREAM), the streams in flight finish, then the connection closes.
* Time limits, checked by the proxy's sweep once a second: a connection without streams
  for the idle timeout is closed with GOAWAY; a non-gRPC request without a response head
  for the response timeout gets 504 (gRPC requests carry their own deadline).
* A peer that sends control frames without reading the answers is cut off when the
  output queued for it passes ``max_write_backlog`` (GOAWAY ENHANCE_YOUR_CALM).
* Metrics and tap: the connection has one ``ConnectionObserver`` from the room's
  ``observer`` (observe.py), each exchange one ``RequestObserver``; the outbound room's
  ``stamp`` (the caller's ``shoal-client-workload``) is added to every request sent on.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from time import monotonic
from typing import Protocol

from ..config import Http1Settings
from ..errors import ProxyError, ResponseTimeout
from ..http1.server import Connections
from ..observe import ConnectionObserver, Observer
from ..route import Target, TcpCounter
from .client import H2Pool
from .codec import (
    ENHANCE_YOUR_CALM,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    CodecError,
    DataReceived,
    GoAwayReceived,
    RequestReceived,
    SettingsChanged,
    StreamReset,
    TrailersReceived,
    WindowOpened,
)
from .conn import H2Conn
from .exchange import Exchange
from .h2codec import H2Codec
from .headers import MalformedHeaders, parse_request

log = logging.getLogger("shoal.proxy.http2")


class H2Router(Protocol):
    """A room's routing rule for HTTP/2: which Target serves a request to
    ``authority`` (None when the request named none); raises a ProxyError to refuse."""

    def route_authority(self, authority: bytes | None) -> Target: ...


class FixedH2Router:
    """Every request to one target (inbound, a port-mapped upstream, a CONNECT tunnel)."""

    def __init__(self, target: Target) -> None:
        self.target = target

    def route_authority(self, authority: bytes | None) -> Target:
        return self.target


@dataclass
class H2Context:
    """What every HTTP/2 client connection of one listener shares."""

    router: H2Router
    pool: H2Pool
    http1: Http1Settings  # the idle and response timeouts, the connect attempts
    tcp: TcpCounter
    connections: Connections
    # Metrics labels and tap for the room (the default: no tap, nothing stamped).
    observer: Observer = field(default_factory=lambda: Observer("inbound"))

    @property
    def max_connect_attempts(self) -> int:
        return self.http1.max_connect_attempts


class ServerConnection(H2Conn):
    def __init__(self, ctx: H2Context, initial: bytes = b"", adopted: bool = False) -> None:
        super().__init__(ctx.pool.flusher, ctx.tcp)
        self.ctx = ctx
        self.initial = initial
        self.adopted = adopted  # taken over from the HTTP/1 engine (already counted)
        self.codec = H2Codec(False, ctx.pool.codec_settings)
        self.goaway_sent = False
        self.peer_gone = False
        self.idle_since = monotonic()
        self.obs: ConnectionObserver | None = None  # set when the connection is made

    # -- lifecycle -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.setup(transport)
        self.obs = self.ctx.observer.connection(transport)
        self.ctx.connections.live.add(self)
        if not self.adopted:
            self.ctx.tcp.opened()
        self.codec.initiate()
        self.mark()
        if self.initial:
            data, self.initial = self.initial, b""
            self.data_received(data)
        if self.ctx.connections.draining:
            self.drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.closing = True
        self.ctx.connections.live.discard(self)
        self.ctx.tcp.closed(exc is not None)
        for exchange in list(self.exchanges.values()):
            exchange.client_reset(0x8)
        self.exchanges.clear()
        self.blocked.clear()

    def eof_received(self) -> bool:
        # A client that half-closes still reads: finish the streams, then close.
        if not self.exchanges:
            return False
        self.peer_gone = True
        return True

    def drain(self) -> None:
        if not self.goaway_sent:
            self.goaway_sent = True
            self.codec.goaway(NO_ERROR, self.codec.last_peer_stream_id)
            self.mark()
        if not self.exchanges:
            self.close()

    def released(self) -> None:
        """An exchange ended."""
        if not self.exchanges:
            self.idle_since = monotonic()
            if self.goaway_sent or self.peer_gone:
                self.close()

    def sweep(self, now: float) -> None:
        if self.closing:
            return
        if not self.exchanges:
            if now - self.idle_since > self.ctx.http1.idle_timeout:
                self.drain()
            return
        timeout = self.ctx.http1.response_timeout
        if timeout:
            for exchange in list(self.exchanges.values()):
                if (not exchange.response_started and not exchange.request.grpc
                        and exchange.started and now - exchange.started > timeout):
                    exchange.fail(ResponseTimeout(f"no response within {timeout:g}s"))
            self.mark()

    # -- bytes in ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.tcp.read(len(data))
        self.ticks += 1
        if self.closing:
            return
        try:
            events = self.codec.receive(data)
        except CodecError as error:
            log.debug("client broke HTTP/2: %s", error)
            self.close()
            return
        exchanges = self.exchanges
        for event in events:
            kind = type(event)
            if kind is DataReceived:
                assert isinstance(event, DataReceived)
                ex = exchanges.get(event.stream_id)
                if ex is None:
                    self.codec.ack(event.stream_id, event.flow_length)
                else:
                    ex.up.receive(event.data, event.flow_length, event.end_stream)
            elif kind is RequestReceived:
                assert isinstance(event, RequestReceived)
                self._request(event)
            elif kind is WindowOpened:
                if event.stream_id == 0:
                    self.unblock()
                else:
                    ex = exchanges.get(event.stream_id)
                    if ex is not None and ex.down is not None and ex.down in self.blocked:
                        self.blocked.discard(ex.down)
                        ex.down.pump()
            elif kind is TrailersReceived:
                assert isinstance(event, TrailersReceived)
                ex = exchanges.get(event.stream_id)
                if ex is not None:
                    ex.request_trailers(event.headers)
            elif kind is StreamReset:
                assert isinstance(event, StreamReset)
                ex = exchanges.get(event.stream_id)
                if ex is not None:
                    ex.client_reset(event.code)
            elif kind is SettingsChanged:
                self.unblock()
            elif kind is GoAwayReceived:
                self.peer_gone = True
                if not exchanges:
                    self.close()
                    return
        self.mark()
        if self.transport.get_write_buffer_size() > self.ctx.pool.settings.max_write_backlog:
            log.info("client does not read what it asks for: closing the connection")
            self.codec.goaway(ENHANCE_YOUR_CALM, self.codec.last_peer_stream_id)
            self.flush()
            self.abort()

    def _request(self, event: RequestReceived) -> None:
        sid = event.stream_id
        if self.goaway_sent:
            self.codec.reset(sid, REFUSED_STREAM)
            return
        try:
            request = parse_request(event.headers)
        except MalformedHeaders as error:
            log.debug("malformed request on stream %d: %s", sid, error)
            self.codec.reset(sid, PROTOCOL_ERROR)
            return
        stamp = self.ctx.observer.stamp
        if stamp is not None:
            request.headers.append(stamp)
        exchange = Exchange(self, sid, request, event.end_stream)
        self.exchanges[sid] = exchange
        try:
            exchange.start(self.ctx.router.route_authority(request.authority))
        except ProxyError as error:
            exchange.fail(error)


async def serve_http2(client: socket.socket, ctx: H2Context, initial: bytes) -> None:
    """Hand an accepted socket to the HTTP/2 engine; ``initial`` is what detection read."""
    loop = asyncio.get_running_loop()
    await loop.connect_accepted_socket(lambda: ServerConnection(ctx, initial), client)


def adopt_server(transport: asyncio.Transport, ctx: H2Context,
                 initial: bytes) -> ServerConnection:
    """Take over a client transport (a CONNECT tunnel carrying HTTP/2) as HTTP/2."""
    conn = ServerConnection(ctx, initial, adopted=True)
    transport.set_protocol(conn)
    conn.connection_made(transport)
    return conn
