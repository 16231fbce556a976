"""Upstream HTTP/2 connections and their pool: requests from every client connection
are multiplexed over one (or a few) connections per endpoint.

``ClientConnection`` hands each upstream event to the exchange that owns the stream.
``H2Pool`` keeps the connections per endpoint: ``ready`` returns one with a free stream
(the synchronous fast path), ``get`` opens another when all are full (one connect shared
by every request waiting for it), up to ``max_connections_per_endpoint`` (then
EndpointBusy, 503). A connection leaves the pool when its peer sends GOAWAY (the
streams it accepted finish, the ones above its last id are sent again elsewhere), when
its stream ids run out, or after ``pool_idle_timeout`` without streams.

Endpoints with an identity (meshed: their proxy has a certificate) are reached over
mutual TLS with ALPN ``h2`` when the pool has TLS (``tls_client``), the peer checked to
be exactly the identity discovery gave (dial.handshake_errors); connections are
kept per (endpoint, identity), so a changed identity never reuses an old connection.
Others get h2c with prior knowledge over plain TCP.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from functools import partial
from time import monotonic
from typing import Final

from .. import tls
from ..config import Http2Settings
from ..dial import dial_plain, dial_tls
from ..errors import (
    EndpointBusy,
    UpstreamReset,
    UpstreamTlsFailed,
)
from ..route import EndpointKey, NullTcpCounter, TcpCounter
from .codec import (
    NO_ERROR,
    CodecError,
    DataReceived,
    GoAwayReceived,
    InformationalReceived,
    ResponseReceived,
    SettingsChanged,
    StreamReset,
    TrailersReceived,
    WindowOpened,
)
from .conn import Flusher, H2Conn
from .h2codec import CodecSettings, H2Codec

log = logging.getLogger("shoal.proxy.http2")

# Connects to one endpoint attempted per request while connections are opening and
# filling up at once (each attempt is bounded by the connect timeout).
MAX_GET_ROUNDS: Final = 4
H2_ALPN: Final = (tls.ALPN_HTTP2,)

PoolKey = tuple[EndpointKey, str]  # the endpoint and the identity its proxy proved


def codec_settings(settings: Http2Settings) -> CodecSettings:
    return CodecSettings(
        max_concurrent_streams=settings.max_concurrent_streams,
        stream_window=settings.stream_window, connection_window=settings.connection_window,
        max_frame_size=settings.max_frame_size,
        max_header_list_size=settings.max_header_list_size)


class ClientConnection(H2Conn):
    def __init__(self, pool: H2Pool, key: EndpointKey, initial: bytes = b"",
                 adopted: bool = False, identity: str = "") -> None:
        super().__init__(pool.flusher, pool.counter(identity))
        self.pool = pool
        self.key = key
        self.identity = identity  # the peer proved it over TLS ("": plaintext)
        self.initial = initial
        self.adopted = adopted  # taken over from the HTTP/1 engine (its open is counted)
        self.retired = False  # takes no new streams (GOAWAY, ids exhausted, closing)
        self.idle_since = 0.0
        self.codec = H2Codec(True, pool.codec_settings)

    # -- lifecycle -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.setup(transport)
        self.codec.initiate()
        self.pool.opened(self)
        self.flush()
        if self.initial:
            data, self.initial = self.initial, b""
            self.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.closing = True
        self.retired = True
        self.pool.lost(self, exc is not None)
        error = UpstreamReset(f"{self.key[0]}:{self.key[1]} closed the HTTP/2 connection")
        for exchange in list(self.exchanges.values()):
            exchange.upstream_failed(error, refused=False)
        self.exchanges.clear()
        self.blocked.clear()

    def eof_received(self) -> bool:
        return False

    @property
    def has_capacity(self) -> bool:
        if self.retired or self.closing:
            return False
        limit = self.pool.settings.max_concurrent_streams
        remote = self.codec.remote_max_streams
        return len(self.exchanges) < (remote if remote < limit else limit)

    def retire(self) -> None:
        """Take no new streams; close once the last one ends."""
        self.retired = True
        if not self.exchanges:
            self.close()

    def released(self) -> None:
        """An exchange left this connection."""
        if not self.exchanges:
            if self.retired:
                self.close()
            else:
                self.idle_since = monotonic()

    # -- bytes in ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.tcp.read(len(data))
        self.ticks += 1
        try:
            events = self.codec.receive(data)
        except CodecError as error:
            log.info("upstream %s:%d broke HTTP/2: %s", self.key[0], self.key[1], error)
            self.retired = True
            self.close()
            return
        exchanges = self.exchanges
        for event in events:
            kind = type(event)
            if kind is DataReceived:
                assert isinstance(event, DataReceived)
                ex = exchanges.get(event.stream_id)
                if ex is None or ex.down is None:
                    self.codec.ack(event.stream_id, event.flow_length)
                else:
                    ex.down.receive(event.data, event.flow_length, event.end_stream)
            elif kind is ResponseReceived:
                assert isinstance(event, ResponseReceived)
                ex = exchanges.get(event.stream_id)
                if ex is not None:
                    ex.on_response(event.headers, event.end_stream)
            elif kind is TrailersReceived:
                assert isinstance(event, TrailersReceived)
                ex = exchanges.get(event.stream_id)
                if ex is not None:
                    ex.on_trailers(event.headers)
            elif kind is WindowOpened:
                if event.stream_id == 0:
                    self.unblock()
                else:
                    ex = exchanges.get(event.stream_id)
                    if ex is not None and ex.up in self.blocked:
                        self.blocked.discard(ex.up)
                        ex.up.pump()
            elif kind is StreamReset:
                assert isinstance(event, StreamReset)
                ex = exchanges.get(event.stream_id)
                if ex is not None:
                    ex.upstream_reset(event.code)
            elif kind is InformationalReceived:
                assert isinstance(event, InformationalReceived)
                ex = exchanges.get(event.stream_id)
                if ex is not None:
                    ex.on_informational(event.headers)
            elif kind is SettingsChanged:
                self.unblock()
            elif kind is GoAwayReceived:
                assert isinstance(event, GoAwayReceived)
                self._goaway(event)
        self.mark()

    def _goaway(self, event: GoAwayReceived) -> None:
        self.retired = True
        if event.code != NO_ERROR:
            log.info("upstream %s:%d sent GOAWAY with error %d: %r", self.key[0], self.key[1],
                     event.code, event.debug[:100])
        error = UpstreamReset(f"{self.key[0]}:{self.key[1]} sent GOAWAY")
        for uid, exchange in list(self.exchanges.items()):
            if uid > event.last_stream_id:
                exchange.upstream_failed(error, refused=True)
        if not self.exchanges:
            self.close()


class H2Pool:
    """The upstream HTTP/2 connections of one direction; see the module docstring."""

    def __init__(self, settings: Http2Settings, flusher: Flusher,
                 tcp: TcpCounter | None = None, tls_client: tls.ClientTls | None = None,
                 tls_tcp: Callable[[str], TcpCounter] | None = None,
                 handshake_timeout: float = tls.TLS_HANDSHAKE_TIMEOUT_SECONDS) -> None:
        self.settings = settings
        self.codec_settings = codec_settings(settings)
        self.flusher = flusher
        self.tcp: TcpCounter = tcp or NullTcpCounter()
        self.tls = tls_client
        self.tls_tcp = tls_tcp
        self.handshake_timeout = handshake_timeout
        self._conns: dict[PoolKey, list[ClientConnection]] = {}
        self._connecting: dict[PoolKey, asyncio.Task[ClientConnection]] = {}
        self.open = 0  # live connections (for tests and the admin page)
        self.created = 0
        self.handshakes = 0

    def counter(self, identity: str) -> TcpCounter:
        if identity and self.tls is not None and self.tls_tcp is not None:
            return self.tls_tcp(identity)
        return self.tcp

    def ready(self, key: EndpointKey, identity: str = "") -> ClientConnection | None:
        conns = self._conns.get((key, identity if self.tls is not None else ""))
        if conns:
            for conn in conns:
                if conn.has_capacity:
                    return conn
        return None

    def count(self, key: EndpointKey, identity: str = "") -> int:
        return len(self._conns.get((key, identity), ()))

    async def get(self, key: EndpointKey, timeout: float,
                  identity: str = "") -> ClientConnection:
        """A connection to ``key`` with a free stream, opening one if needed (TLS to a
        meshed endpoint); the errors of http1.client.Pool.connect."""
        if self.tls is None:
            identity = ""
        pool_key = (key, identity)
        for _ in range(MAX_GET_ROUNDS):
            conn = self.ready(key, identity)
            if conn is not None:
                return conn
            task = self._connecting.get(pool_key)
            if task is None:
                if self.count(key, identity) >= self.settings.max_connections_per_endpoint:
                    raise EndpointBusy(
                        f"{key[0]}:{key[1]}: {self.count(key, identity)} HTTP/2 connections, "
                        f"every stream in use")
                task = asyncio.get_running_loop().create_task(
                    self._connect(key, timeout, identity))
                self._connecting[pool_key] = task
                task.add_done_callback(partial(self._connected, pool_key))
            conn = await asyncio.shield(task)
            if conn.has_capacity:
                return conn
            if conn.retired or conn.closing:  # not full: the peer closed it at once
                raise UpstreamReset(f"{key[0]}:{key[1]} closed the new HTTP/2 connection "
                                    f"(does it speak HTTP/2?)")
        raise EndpointBusy(f"{key[0]}:{key[1]}: no HTTP/2 stream free")

    def _connected(self, pool_key: PoolKey, task: asyncio.Task[ClientConnection]) -> None:
        self._connecting.pop(pool_key, None)
        if not task.cancelled():
            task.exception()  # the waiters got it; nothing is left unretrieved

    async def _connect(self, key: EndpointKey, timeout: float,
                       identity: str) -> ClientConnection:
        if identity and self.tls is not None:
            return await self._connect_tls(key, timeout, identity, self.tls)
        return await dial_plain(lambda: ClientConnection(self, key), key, timeout)

    async def _connect_tls(self, key: EndpointKey, timeout: float, identity: str,
                           client: tls.ClientTls) -> ClientConnection:
        host, port = key
        connection = await dial_tls(client, key, timeout, identity, H2_ALPN,
                                    self.handshake_timeout)
        if connection.ssl_object.selected_alpn_protocol() != tls.ALPN_HTTP2:
            connection.abort()
            raise UpstreamTlsFailed(f"{host}:{port} ({identity}) did not take HTTP/2 (ALPN)")
        self.handshakes += 1
        protocol = ClientConnection(self, key, identity=identity)
        connection.attach(protocol)
        return protocol

    async def adopt(self, key: EndpointKey, sock: socket.socket, initial: bytes = b"") -> None:
        """Take a socket connected to ``key`` (by detection) as an HTTP/2 connection,
        unless a pooled one has room already (then it is closed: streams share);
        ``initial``: what the server already sent (its SETTINGS)."""
        if self.ready(key) is not None:
            sock.close()
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: ClientConnection(self, key, initial),
                                         sock=sock)
        except OSError:
            sock.close()

    def adopt_transport(self, key: EndpointKey, transport: asyncio.Transport,
                        initial: bytes) -> ClientConnection:
        """Take over a connected transport (a CONNECT tunnel's upstream) as HTTP/2."""
        conn = ClientConnection(self, key, initial, adopted=True)
        transport.set_protocol(conn)
        conn.connection_made(transport)
        return conn

    def opened(self, conn: ClientConnection) -> None:
        self.open += 1
        self.created += 1
        if not conn.adopted:
            conn.tcp.opened()
        conn.idle_since = monotonic()
        self._conns.setdefault((conn.key, conn.identity), []).append(conn)

    def lost(self, conn: ClientConnection, error: bool) -> None:
        self.open -= 1
        conn.tcp.closed(error)
        pool_key = (conn.key, conn.identity)
        conns = self._conns.get(pool_key)
        if conns is not None and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[pool_key]

    def sweep(self, now: float) -> None:
        """Close connections without streams for ``pool_idle_timeout``; ``now`` is
        ``time.monotonic()``, the event loop's clock."""
        deadline = now - self.settings.pool_idle_timeout
        for conns in list(self._conns.values()):
            for conn in list(conns):
                if not conn.exchanges and conn.idle_since < deadline:
                    conn.retire()

    def close_all(self) -> None:
        for conns in list(self._conns.values()):
            for conn in list(conns):
                conn.retired = True
                conn.close()
