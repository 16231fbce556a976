"""Upstream HTTP/1.1 connections and their bounded keep-alive pool, one per direction.

``UpstreamProtocol`` parses responses with httptools and hands every event to the
downstream connection that currently owns it (``owner``, a server.ServerProtocol), which
decides what the client sees. Between requests the connection sits in the ``Pool``:
newest first (the warmest connection is reused), at most ``max_idle`` per endpoint, and
closed after ``idle_timeout`` unused, below the shortest keep-alive timeout common servers
use (Node.js closes idle connections after 5 s), so the proxy rarely reuses a connection
the server is closing. When that race happens anyway the engine retries idempotent
requests without a body once on a fresh connection (framing.is_retryable).

After a 101 or a CONNECT the same object relays opaque bytes (``tunnel``).

Endpoints with an identity (meshed: their proxy has a certificate) are reached over
mutual TLS when the pool has TLS (``tls``, the proxy's identity): TCP connect, then the
handshake offering ALPN ``shoal.http1``, checking that the certificate is exactly for the
identity discovery gave. Pooled connections remember that identity, and ``take`` only
returns a connection made for the identity asked for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import httptools

from .. import tls
from ..dial import dial_plain, dial_tls
from ..errors import (
    ProxyError,
    UpstreamMalformed,
)
from ..route import EndpointKey, NullTcpCounter, TcpCounter
from .flow import PEER_FULL, WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW, ReadGate
from .framing import RESPONSE_FIELDS, FieldScan

# What a client proxy offers in ALPN on the HTTP/1 connections it opens to peers.
HTTP1_ALPN = (tls.ALPN_HTTP1,)
# A CONNECT tunnel carries whatever the app sends (TLS, an upgrade...): no protocol is
# offered, so the peer proxy detects what is inside, as it would in plaintext.
TUNNEL_ALPN: tuple[str, ...] = ()

if TYPE_CHECKING:
    from .server import ServerProtocol

log = logging.getLogger("shoal.proxy.http1")


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = (
        "_reason", "closed", "eof", "gate", "identity", "idle_since", "in_pool", "key",
        "max_head_bytes", "on_header", "owner", "parser", "pool", "read_until_close",
        "response_started", "reused", "scan", "stale", "tcp", "transport", "tunnel",
        "write_paused",
    )

    def __init__(self, pool: Pool, key: EndpointKey, identity: str = "") -> None:
        self.pool = pool
        self.key = key
        self.identity = identity  # the peer proved it over TLS ("": plaintext)
        self.tcp = pool.counter(identity)
        self.max_head_bytes = pool.max_head_bytes
        self.owner: ServerProtocol | None = None
        self.scan = FieldScan(RESPONSE_FIELDS)
        self.on_header = self.scan.add  # httptools calls it once per field
        self.parser = httptools.HttpResponseParser(self)
        self._reason = b""
        self.stale = False
        self.response_started = False
        self.read_until_close = False
        self.reused = False
        self.tunnel = False
        self.closed = False
        self.eof = False
        self.write_paused = False
        self.in_pool = False
        self.idle_since = 0.0

    # -- lifecycle ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW)
        self.gate = ReadGate(transport)
        self.pool.open += 1
        self.pool.created += 1
        self.tcp.opened()

    def bind(self, owner: ServerProtocol) -> None:
        """Start an exchange for ``owner``: response events go to it from now on."""
        self.owner = owner
        self.response_started = False
        self.read_until_close = False

    def detach(self) -> None:
        """Another protocol takes this connection's transport (a CONNECT tunnel that
        carries HTTP/2): stop counting it here; its TCP series goes on with the new one."""
        self.owner = None
        self.tunnel = False
        self.closed = True
        self.pool.open -= 1
        self.gate.resume(self.gate.reasons)

    def unbind(self) -> None:
        self.owner = None
        self.gate.resume(PEER_FULL)

    @property
    def usable(self) -> bool:
        return not self.closed and not self.eof and not self.transport.is_closing()

    def close(self) -> None:
        self.owner = None
        if not self.closed:
            self.transport.close()

    def abort(self) -> None:
        self.owner = None
        if not self.closed:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.lost(self, exc is not None)
        owner = self.owner
        if owner is None:
            return
        self.owner = None
        if self.tunnel:
            owner.on_tunnel_closed()
        elif self.read_until_close and exc is None:
            owner.on_response_end(self, [])
            owner.flush()
        else:
            owner.on_upstream_lost(self, exc)

    def eof_received(self) -> bool:
        self.eof = True
        if self.tunnel and self.owner is not None:
            self.owner.on_tunnel_eof(self)
            return True  # keep the transport open to finish writing the other way
        return False

    # -- flow control ------------------------------------------------------------------

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.owner is not None:
            self.owner.gate.pause(PEER_FULL)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.owner is not None:
            self.owner.gate.resume(PEER_FULL)

    # -- bytes in ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        self.tcp.read(len(data))
        if owner is None:
            # Bytes on an idle connection are a protocol error (RFC 9112 9.3.2 allows
            # no unsolicited response): this connection cannot be trusted any more.
            self.transport.abort()
            return
        owner.ticks += 1
        if self.tunnel:
            owner.tunnel_write(data)
            return
        self.response_started = True
        self.stale = False
        try:
            self.parser.feed_data(data)
            if self.scan.size:
                self._check_head()
        except ProxyError as failure:
            if self.owner is owner:
                owner.on_upstream_lost(self, failure)
        except httptools.HttpParserUpgrade as switched:
            if self.owner is owner:
                self.tunnel = True
                owner.on_upstream_switched(self, data[switched.args[0]:])
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            if not isinstance(cause, ProxyError):
                log.error("bug in the HTTP/1 response path", exc_info=cause)
                cause = UpstreamMalformed("malformed response from upstream")
            if self.owner is owner:
                owner.on_upstream_lost(self, cause)
        except httptools.HttpParserError as error:
            if self.owner is owner:
                owner.on_upstream_lost(self, UpstreamMalformed(
                    f"malformed response from upstream: {error}"))
        finally:
            owner.flush()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.scan.reset()
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def _check_head(self) -> None:
        if self.scan.size > self.max_head_bytes:
            raise UpstreamMalformed(
                f"response head from upstream over {self.max_head_bytes} bytes")

    def on_headers_complete(self) -> None:
        owner = self.owner
        assert owner is not None
        self._check_head()
        minor = 0 if self.parser.get_http_version() == "1.0" else 1
        headless = owner.on_response_head(self, self.parser.get_status_code(), self._reason,
                                          minor, self.scan)
        self.scan.trailers()  # what follows the body
        if headless:
            # The response to a HEAD: llhttp could be told it has no body, httptools
            # cannot, so the message ends here, a fresh parser takes the connection's next
            # response, and what the old one reports for the rest of this read is ignored.
            self.parser = httptools.HttpResponseParser(self)
            self.stale = True
            owner.on_response_end(self, [])

    def on_body(self, body: bytes) -> None:
        owner = self.owner
        if owner is not None and not self.stale:
            owner.on_response_body(body)

    def on_message_complete(self) -> None:
        if self.stale:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            return  # interim (relayed at its head) or 101 (the upgrade exception follows)
        owner = self.owner
        if owner is not None:
            owner.on_response_end(self, self.scan.headers)


class Pool:
    """Idle keep-alive connections per endpoint; connecting with a timeout, over mutual
    TLS to endpoints with an identity when ``tls`` is given (see the module docstring).

    ``tcp`` counts plaintext connections; ``tls_tcp(identity)`` gives the counter of
    TLS connections to a peer with that identity (their metric labels differ)."""

    def __init__(self, *, max_idle: int, idle_timeout: float, max_head_bytes: int,
                 tcp: TcpCounter | None = None, tls_client: tls.ClientTls | None = None,
                 tls_tcp: Callable[[str], TcpCounter] | None = None,
                 handshake_timeout: float = tls.TLS_HANDSHAKE_TIMEOUT_SECONDS,
                 meshed_idle_timeout: float | None = None) -> None:
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        # TLS connections to peer proxies: see config.POOL_MESHED_IDLE_TIMEOUT_SECONDS.
        self.meshed_idle_timeout = (idle_timeout if meshed_idle_timeout is None
                                    else meshed_idle_timeout)
        self.max_head_bytes = max_head_bytes
        self.tcp: TcpCounter = tcp or NullTcpCounter()
        self.tls = tls_client
        self.tls_tcp = tls_tcp
        self.handshake_timeout = handshake_timeout
        self._idle: dict[EndpointKey, list[UpstreamProtocol]] = {}
        self.open = 0  # live connections, idle or busy (for tests and the admin page)
        self.created = 0
        self.handshakes = 0  # TLS handshakes completed (connection reuse keeps it low)

    def counter(self, identity: str) -> TcpCounter:
        if identity and self.tls is not None and self.tls_tcp is not None:
            return self.tls_tcp(identity)
        return self.tcp

    def take(self, key: EndpointKey, identity: str = "") -> UpstreamProtocol | None:
        """An idle connection to ``key`` made for ``identity`` (the endpoint's identity;
        ignored by a pool without TLS), or None."""
        stack = self._idle.get(key)
        if self.tls is None:
            identity = ""
        while stack:
            conn = stack.pop()
            conn.in_pool = False
            if conn.usable:
                if conn.identity != identity:  # the endpoint's identity changed
                    conn.close()
                    continue
                conn.reused = True
                return conn
        return None

    def put(self, conn: UpstreamProtocol, now: float) -> None:
        if not conn.usable or conn.tunnel:
            conn.close()
            return
        stack = self._idle.setdefault(conn.key, [])
        if len(stack) >= self.max_idle:
            conn.close()
            return
        conn.owner = None
        conn.idle_since = now
        conn.in_pool = True
        stack.append(conn)

    def lost(self, conn: UpstreamProtocol, error: bool) -> None:
        self.open -= 1
        conn.tcp.closed(error)
        if conn.in_pool:
            conn.in_pool = False
            stack = self._idle.get(conn.key)
            if stack is not None and conn in stack:
                stack.remove(conn)
                if not stack:
                    del self._idle[conn.key]

    def idle_count(self, key: EndpointKey | None = None) -> int:
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(stack) for stack in self._idle.values())

    async def connect(self, key: EndpointKey, timeout: float, identity: str = "",
                      alpn: tuple[str, ...] = HTTP1_ALPN) -> UpstreamProtocol:
        """A fresh connection to ``key``: UpstreamRefused / UpstreamConnectTimeout, and
        with TLS (an ``identity`` and a pool with TLS, offering ``alpn``)
        UpstreamIdentityMismatch / UpstreamTlsFailed / IdentityUnavailable."""
        if identity and self.tls is not None:
            return await self._connect_tls(key, timeout, identity, self.tls, alpn)
        return await dial_plain(lambda: UpstreamProtocol(self, key), key, timeout)

    async def _connect_tls(self, key: EndpointKey, timeout: float, identity: str,
                           client: tls.ClientTls, alpn: tuple[str, ...]) -> UpstreamProtocol:
        connection = await dial_tls(client, key, timeout, identity, alpn,
                                    self.handshake_timeout)
        self.handshakes += 1
        protocol = UpstreamProtocol(self, key, identity)
        connection.attach(protocol)
        return protocol

    def sweep(self, now: float) -> None:
        """Close connections idle longer than ``idle_timeout`` (``meshed_idle_timeout``
        for TLS ones; oldest are at the bottom)."""
        for key in list(self._idle):
            stack = self._idle[key]
            meshed = bool(stack) and bool(stack[0].identity)
            deadline = now - (self.meshed_idle_timeout if meshed else self.idle_timeout)
            stale = 0
            while stale < len(stack) and stack[stale].idle_since < deadline:
                stale += 1
            for conn in stack[:stale]:
                conn.in_pool = False
                conn.close()
            del stack[:stale]
            if not stack:
                del self._idle[key]

    def close_all(self) -> None:
        for stack in self._idle.values():
            for conn in stack:
                conn.in_pool = False
                conn.close()
        self._idle.clear()

