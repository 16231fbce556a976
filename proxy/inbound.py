"""Inbound: connections from other proxies (and clients) to the local application.

Path: accept -> detect (connecting to the app in parallel, so a server that speaks first,
NATS or MySQL, is seen at once) -> forward: HTTP/1 through the engine to the app port
(the connection detection opened is put into the pool), HTTP/2 through the HTTP/2 engine
to the app over h2c (the connection detection opened becomes the first pooled HTTP/2
connection), opaque bytes relayed as they are.
Authorization policy joins this path with the policy issue.

Mutual TLS: detection recognises a TLS ClientHello first, on every port (a meshed peer
always opens with one). When its SNI is an identity name of this mesh (this proxy's own,
normally) the proxy terminates it with the identity's server context (a client
certificate from the mesh is required), records the client's identity (the
``client_id`` label, and later policy), and the ALPN protocol the client offered says
what follows: ``shoal.http1`` -> the HTTP/1 engine, ``shoal.opaque`` -> relayed to the
app, ``h2`` -> HTTP/2; none -> detection on the decrypted bytes. A client proxy that
expected another identity here (stale discovery, a misrouted address) gets this proxy's
certificate and refuses it itself, loudly (502 with the reason), rather than having
its TLS relayed to an app that cannot read it. Any other TLS (an SNI outside the mesh,
or this proxy runs without identity) is the application's own and is relayed
untouched, as are plaintext clients: a non-meshed client still reaches the app (until
policy says otherwise).

The app port is one fixed endpoint: no balancing, Linkerd's inbound connect timeout
(100 ms, the app is local). A port listed as opaque skips HTTP detection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from shoal.kernel import pki

from . import tls
from .accept import classify, connect_tcp
from .config import ProxyConfig
from .detect import MAX_DETECT_BYTES, detect
from .http1.client import Pool
from .http1.server import ServerContext, ServerProtocol
from .http2.client import H2Pool
from .http2.server import FixedH2Router, H2Context, ServerConnection, serve_http2
from .identity import IdentityClient, peer_identity
from .listen import adopt, serve_http1
from .metrics import TcpMetrics
from .observe import Observer, RouteSeries
from .opaque import forward_opaque
from .relay import Relay
from .route import NULL_COUNTER, FixedRouter, FixedTarget
from .runtime import Runtime

log = logging.getLogger("shoal.proxy.inbound")

# Client identities (each a label set: a ServerContext, request and TCP series) kept
# before the cache starts over; the metrics registry bounds the series themselves.
MAX_CLIENT_IDENTITIES = 1024


class _Peer:
    """What connections from one kind of client share: TLS labels, their series (one per
    route and caller, observe.RouteSeries) and the metrics-and-tap hooks (``observer``:
    the room's, or for a mesh client one that knows its identity)."""

    def __init__(self, inbound: Inbound, labels: dict[str, str], observer: Observer) -> None:
        config, metrics = inbound.config, inbound.runtime.metrics
        full = {"target_addr": inbound.target_addr, **labels}
        self.target = FixedTarget(inbound.host, inbound.port, inbound.pool,
                                  NULL_COUNTER,  # every request counts by route
                                  config.inbound.connect_timeout,
                                  series=RouteSeries(metrics, "inbound", full),
                                  peer=inbound.app_peer)
        self.ctx = ServerContext(
            router=FixedRouter(self.target), settings=config.http1,
            tcp=metrics.tcp_metrics("inbound", {"peer": "src", **full}),
            connections=inbound.runtime.connections, observer=observer)
        self.opaque_tcp: TcpMetrics = metrics.tcp_metrics(
            "inbound", {"peer": "src", "protocol": "opaque", **full})
        self.h2ctx = H2Context(router=FixedH2Router(self.target), pool=inbound.h2pool,
                               http1=config.http1, tcp=self.ctx.tcp,
                               connections=inbound.runtime.connections, observer=observer)


class Inbound:
    def __init__(self, config: ProxyConfig, runtime: Runtime, h2pool: H2Pool,
                 identity: IdentityClient | None = None) -> None:
        assert config.app_port is not None
        self.config = config
        self.h2pool = h2pool
        self.runtime = runtime
        self.identity = identity
        self.mesh_suffix = mesh_suffix(identity.identity) if identity is not None else ""
        self.host = config.app_host
        self.port = config.app_port
        self.target_addr = f"{self.host}:{self.port}"
        self.observer = runtime.observer("inbound")
        self.app_peer = self.observer.local_peer(self.host, self.port)  # tap's destination
        self.pool = Pool(
            max_idle=config.inbound.pool_max_idle,
            idle_timeout=config.inbound.pool_idle_timeout,
            max_head_bytes=config.http1.max_response_head_bytes,
            tcp=runtime.metrics.tcp_metrics("inbound", {"peer": "dst",
                                                        "target_addr": self.target_addr}))
        # Series are made when the first connection of their kind comes (no zeros for
        # kinds that never happen): plaintext clients, the app's own TLS, mesh clients.
        self._plain_labels = (tls.TLS_NO_TLS_FROM_REMOTE if identity is not None
                              else tls.TLS_DISABLED)
        self._plain: _Peer | None = None
        self._passthrough: _Peer | None = None
        self._clients: dict[str, _Peer] = {}
        # For tests and operators: what became of TLS connections.
        self.tls_terminated = 0
        self.tls_passthrough = 0
        self.tls_failures = 0
        self.opaque = self.port in config.opaque_ports
        self.unreachable = 0  # opaque connections dropped because the app was down

    @property
    def plain(self) -> _Peer:
        if self._plain is None:
            self._plain = _Peer(self, self._plain_labels, self.observer)
        return self._plain

    @property
    def passthrough(self) -> _Peer:
        if self._passthrough is None:
            self._passthrough = _Peer(self, tls.TLS_PASSTHROUGH, self.observer)
        return self._passthrough

    # Kept for callers that look at the plaintext path's objects.
    @property
    def target(self) -> FixedTarget:
        return self.plain.target

    @property
    def ctx(self) -> ServerContext:
        return self.plain.ctx

    def client(self, identity: str) -> _Peer:
        peer = self._clients.get(identity)
        if peer is None:
            if len(self._clients) >= MAX_CLIENT_IDENTITIES:
                self._clients.clear()
            peer = self._clients[identity] = _Peer(self, tls.client_id_labels(identity),
                                                   self.observer.for_client(identity))
        return peer

    def terminates(self, server_name: str | None) -> bool:
        """Is TLS with this SNI for this proxy to terminate (see the module docstring)?"""
        if self.identity is None or not server_name:
            return False
        return server_name == self.identity.identity or server_name.endswith(
            self.mesh_suffix)

    async def connect(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        return await connect_tcp(loop, self.host, self.port, self.config.inbound.connect_timeout)

    async def handle(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        result = await classify(loop, client, opaque=self.opaque,
                                connect_upstream=self.connect,
                                timeout=self.config.detect_timeout, tls=True)
        peer = self.plain
        initial = result.client_data
        if result.protocol == "tls":
            read = await self._client_hello(client, initial, result.upstream)
            if read is None:
                return
            initial, hello = read
            if hello is not None and self.terminates(hello.server_name):
                await self._terminate(client, initial, result.upstream, result.upstream_data)
                return
            self.tls_passthrough += 1
            peer = self.passthrough  # the app's own TLS: relayed as it is
        elif result.protocol == "http1":
            if result.upstream is not None:
                await adopt(self.pool, self.target.endpoint.key, result.upstream)
            await serve_http1(client, peer.ctx, initial)
            return
        elif result.protocol == "http2":
            peer = self.plain
            if result.upstream is not None:
                await self.h2pool.adopt(peer.target.endpoint.key, result.upstream,
                                        result.upstream_data)
            await serve_http2(client, peer.h2ctx, initial)
            return
        upstream = result.upstream
        if upstream is None:
            self.unreachable += 1
            client.close()
            return
        peer.opaque_tcp.opened()
        await forward_opaque(client, upstream, initial, peer.opaque_tcp,
                             upstream_initial=result.upstream_data)

    async def _client_hello(self, client: socket.socket, initial: bytes,
                            upstream: socket.socket | None
                            ) -> tuple[bytes, tls.ClientHello | None] | None:
        """The whole ClientHello record (read on from what detection read) and what it
        says (None: it does not parse, so it is the application's business). None, with
        both sockets closed, when the client stalls or leaves first."""
        loop = asyncio.get_running_loop()
        try:
            return await tls.read_client_hello(loop, client, initial,
                                               self.config.detect_timeout)
        except (TimeoutError, OSError) as error:
            log.debug("inbound: no complete ClientHello: %s", error)
            client.close()
            if upstream is not None:
                upstream.close()
            return None

    async def _terminate(self, client: socket.socket, initial: bytes,
                         app: socket.socket | None, app_data: bytes = b"") -> None:
        """TLS for this proxy's identity: handshake, then by ALPN to the app. ``app_data``:
        what the app sent already (an HTTP/2 server's SETTINGS): only HTTP/2 can use that
        connection then; the other protocols connect again."""
        loop = asyncio.get_running_loop()
        assert self.identity is not None
        try:
            connection = await tls.terminate(loop, client, self.identity.server_context(),
                                             initial)
        except (ssl.SSLError, OSError, TimeoutError) as error:
            # A client without a mesh certificate, or one from another trust domain.
            self.tls_failures += 1
            log.debug("inbound: TLS handshake failed: %s", error)
            if app is not None:
                app.close()
            return
        self.tls_terminated += 1
        peer = self.client(peer_identity(connection.ssl_object) or "")
        alpn = connection.ssl_object.selected_alpn_protocol()
        if app is not None and app_data and alpn != tls.ALPN_HTTP2:
            app.close()
            app = None
        if alpn == tls.ALPN_HTTP1:
            if app is not None:
                await adopt(self.pool, peer.target.endpoint.key, app)
            connection.attach(ServerProtocol(peer.ctx))
            return
        if alpn == tls.ALPN_HTTP2:
            if app is not None:
                await self.h2pool.adopt(peer.target.endpoint.key, app, app_data)
            connection.attach(ServerConnection(peer.h2ctx))
            return
        if alpn == tls.ALPN_OPAQUE:
            await self._relay(connection, app, peer, b"")
            return
        # No ALPN: a TLS client that is not a Shoal proxy. Detect on the plaintext.
        sniff = _Sniff(self.config.detect_timeout)
        connection.attach(sniff)
        protocol, data = await sniff.result
        if protocol == "http1":
            if app is not None:
                await adopt(self.pool, peer.target.endpoint.key, app)
            server = ServerProtocol(peer.ctx, data)
            connection.transport.set_protocol(server)
            # Resume first (delivery is scheduled, not immediate), so a pause the engine
            # makes in connection_made stays in force.
            connection.transport.resume_reading()
            server.connection_made(connection.transport)
            return
        if protocol == "http2":  # a CONNECT tunnel's HTTP/2 (grpc_proxy), for one
            if app is not None:
                await self.h2pool.adopt(peer.target.endpoint.key, app)
            h2server = ServerConnection(peer.h2ctx, data)
            connection.transport.set_protocol(h2server)
            connection.transport.resume_reading()
            h2server.connection_made(connection.transport)
            return
        if protocol == "closed":
            if app is not None:
                app.close()
            return
        await self._relay(connection, app, peer, data, eof=sniff.eof)

    async def _relay(self, connection: tls.TlsConnection, app: socket.socket | None,
                     peer: _Peer, initial: bytes, eof: bool = False) -> None:
        if app is None:
            try:
                app = await self.connect()
            except OSError as error:
                self.unreachable += 1
                log.debug("inbound: app %s unreachable: %s", self.target_addr, error)
                connection.abort()
                return
        peer.opaque_tcp.opened()
        relay = Relay(peer.opaque_tcp, client_initial=initial)
        if connection.app is None:
            connection.attach(relay.client)
        else:  # after _Sniff: take over the transport (and the EOF it may have seen)
            connection.transport.set_protocol(relay.client)
            relay.client.connection_made(connection.transport)
            if eof:
                relay.client.eof_received()
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: relay.upstream, app)
        except OSError:
            app.close()
            relay.finish(error=True)
        await relay.wait()


def mesh_suffix(identity: str) -> str:
    """``.serviceaccount.identity.<cp-ns>.<trust-domain>`` of an identity name: what
    every identity of the same mesh ends with."""
    marker = f".{pki.IDENTITY_LABEL}.identity."
    at = identity.rfind(marker)
    return identity[at:] if at > 0 else f".{identity}"


class _Sniff(asyncio.Protocol):
    """Detection on decrypted bytes, for a TLS client that offered no ALPN protocol:
    reads until ``detect`` decides (HTTP/1, HTTP/2, else opaque) or the timeout, then pauses
    and hands back what it read."""

    def __init__(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self.result: asyncio.Future[tuple[str, bytes]] = loop.create_future()
        self.buffer = bytearray()
        self.eof = False
        self.transport: asyncio.Transport | None = None
        self._timer = loop.call_later(timeout, self._decide, "opaque")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        verdict = detect(bytes(self.buffer[:MAX_DETECT_BYTES]))
        if verdict is not None:
            self._decide(verdict if verdict in ("http1", "http2") else "opaque")

    def eof_received(self) -> bool:
        self.eof = True
        self._decide("opaque")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._decide("closed")

    def _decide(self, protocol: str) -> None:
        self._timer.cancel()
        if self.result.done():
            return
        if self.transport is not None and protocol != "closed":
            self.transport.pause_reading()
        self.result.set_result((protocol, bytes(self.buffer)))
