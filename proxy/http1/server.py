"""The downstream side of the HTTP/1.1 engine: one ``ServerProtocol`` per client
connection, parsing requests with httptools and relaying each to an upstream connection.

Lifecycle of one request (an ``Exchange``), in order:

  parsed head -> route (the room's Router gives a Target) -> pick an endpoint ->
  an idle pooled connection (synchronous fast path) or connect (a task, retried on
  another endpoint while no request byte has been sent) -> head + body streamed up ->
  response head, body, end streamed down -> connection back to the pool -> next request.

Rules the code keeps:
* One request at a time per client connection. Pipelined requests are parsed as they
  arrive, queued in order, and reading pauses until they are answered; the queue is
  bounded by what a single read delivered.
* Bodies stream both ways as they arrive and are never buffered whole: only the bytes
  that come in while the upstream connection is being set up are held (up to
  ``max_pending_body_bytes``, then reading pauses). Write buffers over their high-water
  mark pause the other side's reads (flow.ReadGate).
* The response head and the body bytes that arrived with it leave in one write
  (``flush`` after each upstream read), which was worth 25% in the anchor measurement.
* Every failure the proxy answers itself goes through errors.render; one that happens
  after the response head was relayed can only cut the connection.
* After a 101 (Upgrade) or a CONNECT both connections relay opaque bytes (a tunnel),
  half-closes included.
* Time limits (request head, idle keep-alive, response head, stalled stream) are checked
  by ``Connections.sweep`` once a second rather than with a timer per request.
* Metrics and tap see the connection through one ``observe.ConnectionObserver`` and each
  request through its ``Exchange``, which is an ``observe.RequestObserver`` (no extra
  object per request); the engine only reports events to it (sent, response head, body
  bytes, end, failure).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from time import monotonic
from typing import TYPE_CHECKING, Protocol, cast

import httptools

from ..detect import HTTP2_PREFACE
from ..errors import (
    EndpointConnectError,
    HeadersTooLarge,
    MalformedRequest,
    NoEndpoints,
    ProxyError,
    RequestHeadTimeout,
    RequestTargetTooLong,
    ResponseTimeout,
    UpstreamReset,
    render,
)
from ..observe import ConnectionObserver, Observer, RequestObserver
from ..route import EndpointKey, EndpointRef, Target, TcpCounter
from .client import HTTP1_ALPN, TUNNEL_ALPN
from .flow import (
    PEER_FULL,
    PENDING,
    PIPELINE,
    UPGRADE,
    WRITE_BUFFER_HIGH,
    WRITE_BUFFER_LOW,
    ReadGate,
)
from .framing import (
    CRLF,
    REQUEST_FIELDS,
    Body,
    FieldScan,
    Header,
    RequestHead,
    ResponseHead,
    analyze_request,
    analyze_response,
    chunk_header,
    is_retryable,
    last_chunk,
    render_interim,
    render_request_head,
    render_response_head,
)

if TYPE_CHECKING:
    from ..config import Http1Settings
    from .client import UpstreamProtocol

log = logging.getLogger("shoal.proxy.http1")

CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"


class Router(Protocol):
    """A room's routing rule: which Target serves this request. May rewrite the head
    (absolute-form to origin-form, the Host to send); raises a ProxyError to refuse."""

    def route(self, head: RequestHead) -> Target: ...


class LiveConnection(Protocol):
    """A client connection of any protocol engine (this one's, or HTTP/2's)."""

    closing: bool
    transport: asyncio.Transport

    def sweep(self, now: float) -> None: ...

    def drain(self) -> None: ...

    def abort(self) -> None: ...


TunnelH2 = Callable[[asyncio.Transport, bytes, Target, asyncio.Transport | None, EndpointKey,
                    bytes], None]


class Connections:
    """The live client connections of a proxy: swept once a second for time limits,
    and told to drain on shutdown."""

    def __init__(self) -> None:
        self.live: set[LiveConnection] = set()
        self.draining = False

    def sweep(self, now: float) -> None:
        for conn in list(self.live):
            conn.sweep(now)

    def drain(self) -> None:
        """Idle connections close now; busy ones after their current response (which
        carries ``Connection: close``); tunnels run until the drain timeout."""
        self.draining = True
        for conn in list(self.live):
            conn.drain()

    def close_all(self) -> None:
        for conn in list(self.live):
            conn.abort()


@dataclass
class ServerContext:
    """What every client connection of one listener shares."""

    router: Router
    settings: Http1Settings
    tcp: TcpCounter
    connections: Connections
    # Metrics labels and tap for the room (the default: no tap, nothing stamped).
    observer: Observer = field(default_factory=lambda: Observer("inbound"))
    # Given, a CONNECT tunnel whose client starts with the HTTP/2 preface is handed to it
    # (client transport, bytes read, the tunnel's target, upstream transport, its
    # endpoint, bytes the upstream sent) instead of being relayed as bytes.
    tunnel_h2: TunnelH2 | None = None


class Exchange(RequestObserver):
    """One request and its response on a client connection, and the request's metrics
    and tap hooks (RequestObserver: ``begun`` once counted, ``response_start`` ...).

    Defaults live on the class: a new exchange costs one empty instance, and only what
    happens to it is written (the hot path makes several per request).
    """

    head: RequestHead | None = None
    error: ProxyError | None = None
    target: Target | None = None
    endpoint: EndpointRef | None = None
    upstream: UpstreamProtocol | None = None
    task: asyncio.Task[None] | None = None
    pending: list[bytes] | None = None  # body bytes held until the upstream is attached
    pending_bytes = 0
    request_done = False
    response: ResponseHead | None = None
    out_body: Body | None = None
    close_after = False
    balanced = False  # the balancer has been told how it ended
    retried = False
    done = False
    started = 0.0
    first_seen = 0.0
    upgrade_tail: bytes | None = None


class ServerProtocol(asyncio.Protocol):
    def __init__(self, ctx: ServerContext, initial: bytes = b"") -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.router = ctx.router
        self.initial = initial
        self.loop = asyncio.get_running_loop()
        self.scan = FieldScan(REQUEST_FIELDS)
        self.on_header = self.scan.add  # httptools calls it once per field
        self.parser = httptools.HttpRequestParser(self)
        self.current: Exchange | None = None
        self.queue: deque[Exchange] = deque()
        self.parsing: Exchange | None = None
        self.last_parsed: Exchange | None = None
        self.peer: UpstreamProtocol | None = None
        self.tunnel = False
        self.ticks = 0
        self._seen_ticks = -1
        self._quiet_since = 0.0
        self._out: list[bytes] = []
        self._url = b""
        self.closed = False
        self.closing = False
        self.eof = False
        self.upgrading = False
        self.broken = False
        self.write_paused = False
        self._advancing = False
        self.sniffing: bytearray | None = None  # a CONNECT tunnel's first client bytes
        self._sniff_held = b""  # upstream bytes held while sniffing
        self._sniff_target: Target | None = None

    # -- connection lifecycle ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW)
        self.gate = ReadGate(transport)
        self.obs: ConnectionObserver = self.ctx.observer.connection(transport)
        self.ctx.connections.live.add(self)
        self.ctx.tcp.opened()
        if self.ctx.connections.draining:
            self._close()
            return
        if self.initial:
            data, self.initial = self.initial, b""
            self.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.closing = True
        self.ctx.connections.live.discard(self)
        self.ctx.tcp.closed(exc is not None)
        ex = self.current
        if ex is not None:
            if ex.task is not None:
                ex.task.cancel()
                ex.task = None
            if ex.begun and not ex.done:
                ex.fail(0, "CANCEL")
            conn = ex.upstream
            if conn is not None:
                # The client went away mid-exchange: not the endpoint's fault.
                self._settle(ex, success=True)
                ex.upstream = None
                conn.close()
        if self.tunnel and self.peer is not None:
            self.peer.close()
        self.peer = None
        self.current = None
        self.queue.clear()

    def eof_received(self) -> bool:
        self.eof = True
        if self.tunnel:
            peer = self.peer
            if peer is None or peer.closed or peer.eof:
                self._close()
                return False
            if peer.transport.can_write_eof():
                peer.transport.write_eof()
            return True
        parsing = self.parsing
        self.parsing = None  # a partial head is discarded
        if parsing is not None and parsing.head is not None and not parsing.done:
            # The body can never complete: that request is answered 400, then we close.
            error = MalformedRequest("malformed request: the client closed its side "
                                     "before the end of the body")
            parsing.error = error
            if parsing is self.current:
                self._fail(parsing, error)
            return not self.closing
        if self.current is None and not self.queue:
            self._close()
            return False
        return True  # half-closed: answer what was asked, then close (see _advance)

    def _close(self) -> None:
        if not self.closing:
            self.closing = True
            self.flush()
            self.transport.close()

    def abort(self) -> None:
        self.closing = True
        self._out.clear()
        self.transport.abort()

    def drain(self) -> None:
        if self.current is None and not self.queue and not self.tunnel:
            self._close()

    # -- flow control ------------------------------------------------------------------

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.peer is not None:
            self.peer.gate.pause(PEER_FULL)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.peer is not None:
            self.peer.gate.resume(PEER_FULL)

    def flush(self) -> None:
        out = self._out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            if not self.closed:
                self.transport.write(data)
                self.ctx.tcp.wrote(len(data))

    def tunnel_write(self, data: bytes) -> None:
        if self.sniffing is not None:
            if not self.sniffing:  # the server spoke first: not HTTP/2, relay from now on
                self._end_sniff()
            else:  # the client is sending the preface: hold the server's bytes till then
                self._sniff_held += data
                if self.peer is not None:
                    self.peer.gate.pause(UPGRADE)
                return
        if not self.closed:
            self.transport.write(data)
            self.ctx.tcp.wrote(len(data))

    # -- bytes in ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.ticks += 1
        self.ctx.tcp.read(len(data))
        if self.tunnel:
            if self.sniffing is not None:
                self._sniff(data)
                return
            peer = self.peer
            if peer is not None:
                peer.transport.write(data)
            return
        if self.upgrading or self.broken or self.closing:
            ex = self.last_parsed
            if self.upgrading and ex is not None and ex.upgrade_tail is not None:
                ex.upgrade_tail += data  # at most one read: reading is paused (UPGRADE)
            return
        try:
            self.parser.feed_data(data)
            if self.scan.size and self.parsing is not None:
                self._check_head()
        except ProxyError as error:
            self._parse_failed(error)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade_requested(data[upgrade.args[0]:])
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            if not isinstance(cause, ProxyError):
                log.error("bug in the HTTP/1 request path", exc_info=cause)
                cause = MalformedRequest("malformed request")
            self._parse_failed(cause)
        except httptools.HttpParserError as error:
            self._parse_failed(MalformedRequest(f"malformed request: {error}"))

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.parsing = Exchange()
        self._url = b""
        self.scan.reset()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.settings.max_request_target_bytes:
            raise RequestTargetTooLong(
                f"request target over {self.settings.max_request_target_bytes} bytes")

    def _check_head(self) -> None:
        """A head still incomplete after a read must not have outgrown the limits."""
        scan = self.scan
        if scan.size > self.settings.max_request_head_bytes or (
                len(scan.headers) > self.settings.max_headers):
            raise HeadersTooLarge(
                f"request headers over the limit ({self.settings.max_headers} fields, "
                f"{self.settings.max_request_head_bytes} bytes)")

    def on_headers_complete(self) -> None:
        ex = self.parsing
        if ex is None or self.closing:
            return
        self._check_head()
        parser = self.parser
        minor = 0 if parser.get_http_version() == "1.0" else 1
        ex.head = analyze_request(parser.get_method(), self._url, minor, self.scan)
        self.scan.trailers()  # what follows the body, with a budget of its own
        if self.current is None and not self.queue:
            self._begin(ex)
        else:
            self.queue.append(ex)
            self.gate.pause(PIPELINE)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is None or ex.done or ex.head is None:
            return
        if ex.head.body is Body.CHUNKED:
            body = chunk_header(len(body)) + body + CRLF
        conn = ex.upstream
        if conn is not None:
            conn.transport.write(body)
            return
        if ex.pending is None:
            ex.pending = []
        ex.pending.append(body)
        ex.pending_bytes += len(body)
        if ex.pending_bytes > self.settings.max_pending_body_bytes:
            self.gate.pause(PENDING)

    def on_message_complete(self) -> None:
        ex = self.parsing
        self.parsing = None
        self.last_parsed = ex
        if ex is None or ex.done or ex.head is None:
            return
        ex.request_done = True
        if ex.head.body is Body.CHUNKED:
            end = last_chunk(self.scan.headers)
            conn = ex.upstream
            if conn is not None:
                conn.transport.write(end)
            elif ex.pending is None:
                ex.pending = [end]
            else:
                ex.pending.append(end)

    def _parse_failed(self, error: ProxyError) -> None:
        """The request stream is broken: answer what came before, then this error."""
        self.broken = True
        self.gate.pause(PIPELINE)
        ex = self.parsing
        self.parsing = None
        if ex is None or ex.head is None:
            ex = ex or Exchange()
            ex.error = error
            ex.request_done = True
            if self.current is None and not self.queue:
                self._begin(ex)
            else:
                self.queue.append(ex)
        elif not ex.done:
            ex.error = error
            if ex is self.current:
                self._fail(ex, error)

    def _upgrade_requested(self, tail: bytes) -> None:
        """httptools stopped after an Upgrade or CONNECT request: what follows is not
        HTTP; hold it (reading paused) until the upstream agrees to switch."""
        self.upgrading = True
        self.gate.pause(UPGRADE)
        ex = self.last_parsed
        if ex is not None and not ex.done:
            ex.upgrade_tail = tail
        else:
            self._close()

    # -- dispatch ----------------------------------------------------------------------

    def _advance(self) -> None:
        """Start queued requests in order; close when asked to and nothing is left."""
        if self._advancing:
            return
        self._advancing = True
        try:
            while self.current is None and self.queue and not self.closing:
                self._begin(self.queue.popleft())
            if self.current is None and not self.queue and not self.closing:
                if self.eof or self.ctx.connections.draining:
                    self._close()
                elif not self.broken:
                    self.gate.resume(PIPELINE)
        finally:
            self._advancing = False

    def _begin(self, ex: Exchange) -> None:
        self.current = ex
        if ex.error is not None or ex.head is None:
            self._fail(ex, ex.error or MalformedRequest("malformed request"))
            return
        try:
            target = self.router.route(ex.head)
            ex.target = target
            now = monotonic()
            if ex.head.is_connect:
                ex.started = now
                ex.task = self.loop.create_task(self._dispatch(ex, target, None, fresh=True))
                return
            endpoint = target.pick(now, ())
        except ProxyError as error:
            self._fail(ex, error)
            return
        if endpoint is not None:
            conn = target.pool.take(endpoint.key, endpoint.identity)
            if conn is not None:
                self._attach(ex, conn, endpoint, now)
                return
        ex.task = self.loop.create_task(self._dispatch(ex, target, endpoint, fresh=False))

    async def _dispatch(self, ex: Exchange, target: Target, endpoint: EndpointRef | None,
                        fresh: bool) -> None:
        """The slow path: wait for an endpoint (fail-fast bound), connect (timeout; TLS
        to meshed endpoints), and on a connection error, a refused handshake or a peer
        that is not who discovery said, try another endpoint: nothing has been sent."""
        exclude: list[EndpointKey] = []
        last_error: ProxyError | None = None
        try:
            for _ in range(self.settings.max_connect_attempts):
                if endpoint is None:
                    if last_error is not None:
                        raise last_error
                    endpoint = await target.wait_pick(exclude)
                conn = None if fresh else target.pool.take(endpoint.key, endpoint.identity)
                if conn is None:
                    tunnel = ex.head is not None and ex.head.is_connect
                    try:
                        conn = await target.pool.connect(
                            endpoint.key, target.connect_timeout, endpoint.identity,
                            TUNNEL_ALPN if tunnel else HTTP1_ALPN)
                    except EndpointConnectError as error:
                        now = monotonic()
                        target.on_connect_error(endpoint, now)
                        exclude.append(endpoint.key)
                        last_error = error
                        endpoint = target.pick(now, exclude)
                        continue
                ex.task = None
                if self.closing or self.current is not ex:
                    target.pool.put(conn, monotonic())
                    return
                if ex.head is not None and ex.head.is_connect:
                    self._open_tunnel(ex, conn, endpoint)
                else:
                    self._attach(ex, conn, endpoint, monotonic())
                return
            raise last_error or NoEndpoints("no endpoint could be reached")
        except ProxyError as error:
            ex.task = None
            if not self.closing and self.current is ex:
                self._fail(ex, error)

    def _attach(self, ex: Exchange, conn: UpstreamProtocol, endpoint: EndpointRef,
                now: float) -> None:
        head = ex.head
        target = ex.target
        assert head is not None and target is not None
        ex.upstream = conn
        ex.endpoint = endpoint
        ex.started = now
        self.peer = conn
        conn.bind(self)
        if self.write_paused:
            conn.gate.pause(PEER_FULL)
        if conn.write_paused:
            self.gate.pause(PEER_FULL)
        target.on_dispatch(endpoint, now)
        if not ex.begun:  # not again when a stale pooled connection is replaced
            self.obs.start(ex, target, endpoint, head.method, head.host or target.authority,
                           head.target, head.headers, head.client_workload, now)
            stamp = self.ctx.observer.stamp
            if stamp is not None:
                head.headers.append(stamp)
        data = render_request_head(head)
        if ex.pending:
            data = b"".join([data, *ex.pending])
            ex.pending = None
            ex.pending_bytes = 0
            self.gate.resume(PENDING)
        conn.transport.write(data)

    def _open_tunnel(self, ex: Exchange, conn: UpstreamProtocol, endpoint: EndpointRef) -> None:
        """CONNECT succeeded: tell the client, then relay bytes both ways."""
        target = ex.target
        assert target is not None
        now = monotonic()
        ex.endpoint = endpoint
        target.on_dispatch(endpoint, now)
        target.on_complete(endpoint, now, now - ex.started, True)
        # An established tunnel is transport, not a request: what runs inside it is
        # counted there (HTTP/2 per request, anything else as TCP), so `viz top` shows the
        # app's calls, not a CONNECT row per channel. A refused CONNECT is still counted.
        conn.bind(self)
        conn.tunnel = True
        self.peer = conn
        self.tunnel = True
        ex.done = True
        self.current = None
        self.tunnel_write(CONNECT_ESTABLISHED)
        if self.ctx.tunnel_h2 is not None:
            self.sniffing = bytearray()
            self._sniff_target = target
        if ex.upgrade_tail:
            if self.sniffing is not None:
                self._sniff(ex.upgrade_tail)
            else:
                conn.transport.write(ex.upgrade_tail)
        self.upgrading = False
        if self.write_paused:
            conn.gate.pause(PEER_FULL)
        self.gate.resume(UPGRADE)

    # -- response events (called by the bound UpstreamProtocol) ------------------------

    def on_response_head(self, conn: UpstreamProtocol, status: int, reason: bytes, minor: int,
                         scan: FieldScan) -> bool:
        """A response head arrived; True when it is a response to HEAD, whose body the
        parser must not wait for."""
        ex = self.current
        if ex is None or ex.upstream is not conn or ex.head is None:
            return False
        if status < 200 and status != 101:
            if ex.head.minor >= 1:  # HTTP/1.0 clients get no interim responses
                self._out.append(render_interim(status, reason, scan.headers))
            return False
        head = ex.head
        response = analyze_response(status, reason, minor, scan, head)
        ex.response = response
        now = monotonic()
        rtt = now - ex.started
        success = status < 500
        if not ex.balanced:
            ex.balanced = True
            ex.target.on_complete(ex.endpoint, now, rtt, success)  # type: ignore[union-attr,arg-type]
        ex.response_start(status, response.headers, now)
        if response.upgrade is not None:
            self._out += render_response_head(response, Body.NONE, False, head.minor)
            return False  # the switch follows (on_upstream_switched)
        out_body = response.body
        if out_body is Body.CHUNKED and head.minor == 0:
            out_body = Body.CLOSE  # framing.downstream_body: no chunks for HTTP/1.0
        close = (not head.keep_alive or out_body is Body.CLOSE or not ex.request_done
                 or self.upgrading or self.ctx.connections.draining)  # must_close_downstream
        ex.out_body = out_body
        ex.close_after = close
        if response.body is Body.CLOSE:
            conn.read_until_close = True
        self._out += render_response_head(response, out_body, close, head.minor)
        return head.method == b"HEAD"

    def on_response_body(self, body: bytes) -> None:
        ex = self.current
        if ex is None or ex.out_body is None:
            return
        ex.response_bytes += len(body)
        if ex.out_body is Body.CHUNKED:
            self._out += (chunk_header(len(body)), body, CRLF)
        else:
            self._out.append(body)

    def on_response_end(self, conn: UpstreamProtocol, trailers: list[Header]) -> None:
        ex = self.current
        if ex is None or ex.upstream is not conn or ex.response is None:
            return
        if ex.out_body is Body.CHUNKED:
            self._out.append(last_chunk(trailers))
        if ex.needs_end:  # gRPC or tapped
            ex.response_end(trailers)
        # The fast path of _release + _finish + _advance for a kept-alive connection.
        ex.upstream = None
        self.peer = None
        conn.owner = None
        if conn.gate.reasons:
            conn.gate.resume(PEER_FULL)
        if self.gate.reasons:
            self.gate.resume(PEER_FULL)
        if ex.response.keep_alive and ex.request_done:
            ex.target.pool.put(conn, monotonic())  # type: ignore[union-attr]
        else:
            conn.close()
        ex.done = True
        self.current = None
        if ex.close_after or self.closing:
            self._close()
        elif self.queue or self.eof or self.broken or self.ctx.connections.draining:
            self._advance()
        elif self.gate.reasons:
            self.gate.resume(PIPELINE)

    def on_upstream_lost(self, conn: UpstreamProtocol,
                         failure: BaseException | None) -> None:
        """The upstream connection failed (closed, reset, malformed, timed out)."""
        ex = self.current
        if ex is None or ex.upstream is not conn:
            conn.close()
            return
        if ex.response is None:
            clean_close = not isinstance(failure, ProxyError)
            head = ex.head
            if (clean_close and conn.reused and not conn.response_started and not ex.retried
                    and ex.request_done and head is not None and is_retryable(head)
                    and ex.target is not None and ex.endpoint is not None):
                # A pooled connection the server had just closed: send again on a new one.
                ex.retried = True
                self._settle(ex, success=True)
                self._release(ex, conn, reusable=False)
                ex.task = self.loop.create_task(
                    self._dispatch(ex, ex.target, ex.endpoint, fresh=True))
                return
            error = failure if isinstance(failure, ProxyError) else UpstreamReset(
                f"{conn.key[0]}:{conn.key[1]} closed the connection before responding")
            self._settle(ex, success=False)
            self._release(ex, conn, reusable=False)
            self._fail(ex, error)
            return
        # Mid-body: the client's response is cut short; closing is all that is left.
        ex.fail(0, "INTERNAL_ERROR")
        self._release(ex, conn, reusable=False)
        self.flush()
        self.abort()

    def on_upstream_switched(self, conn: UpstreamProtocol, tail: bytes) -> None:
        """The upstream answered 101: from now on both connections relay bytes."""
        ex = self.current
        if ex is None or ex.upstream is not conn or ex.response is None:
            conn.abort()
            return
        self.flush()
        ex.response_end()
        if tail:
            self.tunnel_write(tail)
        self.tunnel = True
        ex.done = True
        self.current = None
        if ex.upgrade_tail:
            conn.transport.write(ex.upgrade_tail)
        self.upgrading = False
        self.gate.resume(UPGRADE)

    def _sniff(self, data: bytes) -> None:
        """A CONNECT tunnel's first client bytes: HTTP/2 (grpcio through ``grpc_proxy``)
        is handed to ctx.tunnel_h2 and balanced per request; anything else is relayed."""
        sniffed = self.sniffing
        assert sniffed is not None
        sniffed += data
        size = min(len(sniffed), len(HTTP2_PREFACE))
        if sniffed[:size] != HTTP2_PREFACE[:size]:
            self._end_sniff()
            return
        if len(sniffed) < len(HTTP2_PREFACE):
            return
        peer, target, hook = self.peer, self._sniff_target, self.ctx.tunnel_h2
        if peer is None or target is None or hook is None or peer.closed:
            self._end_sniff()
            return
        # Hand both transports over: this protocol and the tunnel are done with them.
        held, self._sniff_held = self._sniff_held, b""
        self.sniffing = None
        self.tunnel = False
        self.peer = None
        self.closed = self.closing = True
        self.ctx.connections.live.discard(self)
        peer.detach()
        self.gate.resume(self.gate.reasons)
        upstream: asyncio.Transport | None = peer.transport
        if peer.identity:  # TLS made for HTTP/1 (ALPN shoal.http1): of no use to HTTP/2
            peer.transport.abort()
            upstream = None
        hook(self.transport, bytes(sniffed), target, upstream, peer.key, held)

    def _end_sniff(self) -> None:
        sniffed = self.sniffing
        self.sniffing = None
        held, self._sniff_held = self._sniff_held, b""
        peer = self.peer
        if peer is None:
            return
        if sniffed:
            peer.transport.write(bytes(sniffed))
        if held:
            self.tunnel_write(held)
        peer.gate.resume(UPGRADE)

    def on_tunnel_eof(self, conn: UpstreamProtocol) -> None:
        if self.eof:
            self._close()
            conn.close()
        elif self.transport.can_write_eof():
            self.flush()
            self.transport.write_eof()

    def on_tunnel_closed(self) -> None:
        self.peer = None
        self._close()

    # -- endings -----------------------------------------------------------------------

    def _settle(self, ex: Exchange, success: bool, now: float | None = None,
                rtt: float | None = None) -> None:
        """Tell the balancer how the request to its endpoint ended, once."""
        if ex.balanced or ex.target is None or ex.endpoint is None or not ex.started:
            return
        ex.balanced = True
        if now is None:
            now = monotonic()
        ex.target.on_complete(ex.endpoint, now, now - ex.started if rtt is None else rtt,
                              success)

    def _release(self, ex: Exchange, conn: UpstreamProtocol, reusable: bool) -> None:
        ex.upstream = None
        self.peer = None
        conn.unbind()
        self.gate.resume(PEER_FULL)
        if reusable and ex.target is not None:
            ex.target.pool.put(conn, monotonic())
        else:
            conn.close()

    def _fail(self, ex: Exchange, error: ProxyError) -> None:
        """Answer ``error`` for ``ex`` (the current exchange) through errors.render."""
        if ex.task is not None:
            ex.task.cancel()
            ex.task = None
        conn = ex.upstream
        if conn is not None:
            # A client's fault (4xx) says nothing about the endpoint.
            self._settle(ex, success=error.status < 500)
            self._release(ex, conn, reusable=False)
        head = ex.head
        if not ex.begun and head is not None:
            # Answered before any upstream was reached: counted (on the target's series
            # without endpoint labels, when routing got that far) and tapped all the same.
            self.obs.start(ex, ex.target, None, head.method, head.host or b"", head.target,
                           head.headers, head.client_workload, ex.started or monotonic())
        if ex.out_body is not None:  # the response head already went out
            if ex.begun:
                ex.fail(0, "INTERNAL_ERROR")
            self.flush()
            self.abort()
            return
        if ex.begun:
            ex.fail(error.status)
        # A request without a body is complete at its head, even if the error comes
        # before httptools reports the message complete.
        complete = ex.request_done or (head is not None and head.body is Body.NONE)
        close = (error.fatal or head is None or not complete or not head.keep_alive
                 or self.ctx.connections.draining or self.upgrading)
        self._out.append(render(error, close=close,
                                head_only=head is not None and head.method == b"HEAD"))
        ex.close_after = close
        self.flush()
        self._finish(ex)

    def _finish(self, ex: Exchange) -> None:
        ex.done = True
        if self.current is ex:
            self.current = None
        if ex.close_after or self.closing:
            self._close()
            return
        self._advance()

    # -- time limits -------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        if self.closing:
            return
        if self.ticks != self._seen_ticks:
            self._seen_ticks = self.ticks
            self._quiet_since = now
        quiet = now - self._quiet_since
        settings = self.settings
        if self.tunnel:
            if quiet > settings.stream_idle_timeout:
                self._close_tunnel()
            return
        ex = self.current
        if ex is None and not self.queue:
            parsing = self.parsing
            if parsing is None:
                if quiet > settings.idle_timeout:
                    self._close()
            elif parsing.head is None:
                if not parsing.first_seen:
                    parsing.first_seen = now
                elif now - parsing.first_seen > settings.request_head_timeout:
                    self._parse_failed(RequestHeadTimeout(
                        f"request head not complete within {settings.request_head_timeout:g}s"))
            elif quiet > settings.stream_idle_timeout:
                self.abort()
            return
        if (ex is not None and ex.response is None and ex.upstream is not None
                and settings.response_timeout and now - ex.started > settings.response_timeout):
            self.on_upstream_lost(ex.upstream, ResponseTimeout(
                f"no response within {settings.response_timeout:g}s"))
        elif quiet > settings.stream_idle_timeout and (ex is None or ex.task is None):
            self.abort()

    def _close_tunnel(self) -> None:
        peer = self.peer
        if peer is not None:
            peer.close()
        self._close()

