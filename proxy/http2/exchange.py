"""One request relayed over HTTP/2: the client's stream paired 1:1 with a stream on an
upstream connection, and the two ``Flow``s that move DATA between them.

Lifecycle of an ``Exchange``, in order:

  request head (server.py) -> route -> pick an endpoint (per request: the balancer) ->
  a pooled upstream connection with a free stream (synchronous fast path) or
  ``_dispatch`` (connect, retrying another endpoint on a connection error) -> request
  head and body up (``up`` flow) -> response head, body, trailers down (``down`` flow)
  -> both directions ended: ``_complete`` counts it and frees both streams.

Rules:
* Resets go to the other peer: the client's RST_STREAM becomes CANCEL upstream; the
  upstream's is passed to the client with its code (after a complete response a reset
  only stops the request body, RFC 9113 8.1).
* A stream the upstream refused (REFUSED_STREAM, or above the last id of its GOAWAY) is
  sent again on another connection if none of its body went up yet; otherwise the client
  gets REFUSED_STREAM, which tells it the request was not processed.
* Proxy errors before the response head become a response (errors.render_h2: a
  trailers-only gRPC status for gRPC); after it, a reset (or, for an expired gRPC
  deadline, trailers with DEADLINE_EXCEEDED).
* ``grpc-timeout`` is honoured with one timer per request that carries it.
* Metrics and tap through one ``RequestObserver`` per request (observe.py, as the HTTP/1
  engine): opened when the request is first sent upstream (or answered by the proxy),
  ``response_start`` with the response head, ``response_end`` when the stream ends
  (the grpc-status from the trailers or a trailers-only head), ``fail`` when a stream
  is cut (the reset's RFC 9113 name: CANCEL from the client, INTERNAL_ERROR, or the
  upstream's code). Non-gRPC responses are counted at their head, gRPC ones at the end
  (classification, grpc.py: success only with grpc-status 0); the route label of a
  gRPC request is its method path. The balancer gets the time to the response head and
  whether the endpoint failed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from time import monotonic
from typing import TYPE_CHECKING

from ..errors import (
    DeadlineExceeded,
    EndpointConnectError,
    NoEndpoints,
    ProxyError,
    UpstreamMalformed,
    UpstreamReset,
    render_h2,
)
from ..observe import RequestObserver
from ..route import EndpointKey, EndpointRef, Target
from . import grpc
from .codec import (
    CANCEL,
    INTERNAL_ERROR,
    NO_ERROR,
    PROTOCOL_ERROR,
    Headers,
    StreamClosed,
    error_name,
)
from .headers import MalformedHeaders, Request, scan_response, scan_trailers

log = logging.getLogger("shoal.proxy.http2")

if TYPE_CHECKING:
    from .client import ClientConnection
    from .conn import H2Conn
    from .server import ServerConnection


class Flow:
    """One direction of an exchange: DATA (and trailers) from ``src``'s stream to
    ``dst``'s, acknowledged to ``src`` as it moves on (see conn.py)."""

    __slots__ = ("buf", "dst", "dst_id", "end_received", "exchange", "finished", "sent",
                 "size", "src", "src_id", "trailers")

    def __init__(self, exchange: Exchange, src: H2Conn, src_id: int) -> None:
        self.exchange = exchange
        self.src = src
        self.src_id = src_id
        self.dst: H2Conn | None = None
        self.dst_id = 0
        self.buf: deque[bytes] = deque()
        self.size = 0
        self.sent = 0
        self.end_received = False
        self.trailers: Headers | None = None
        self.finished = False  # the end of the stream went to dst

    def receive(self, data: bytes, flow_length: int, end: bool) -> None:
        if self.finished:  # the other side is gone (reset, answered): credit and forget
            self.src.codec.ack(self.src_id, flow_length)
            self.src.mark()
            return
        if flow_length > len(data):  # padding: nothing to forward, credit it back now
            self.src.codec.ack(self.src_id, flow_length - len(data))
            self.src.mark()
        if data:
            self.buf.append(data)
            self.size += len(data)
        if end:
            self.end_received = True
        if self.dst is not None:
            self.pump()

    def end_with(self, trailers: Headers) -> None:
        self.trailers = trailers
        self.end_received = True
        if self.dst is not None:
            self.pump()

    def drop(self) -> None:
        """Forget buffered bytes (the stream is over), crediting them to the source."""
        if self.size:
            self.src.codec.ack(self.src_id, self.size)
            self.src.mark()
        self.buf.clear()
        self.size = 0

    def pump(self) -> None:
        dst = self.dst
        if dst is None or self.finished:
            return
        codec = dst.codec
        sid = self.dst_id
        buf = self.buf
        moved = 0
        try:
            while buf:
                if dst.write_paused:
                    dst.blocked.add(self)
                    break
                window = codec.send_window(sid)
                if window <= 0:
                    dst.blocked.add(self)
                    break
                chunk = buf[0]
                size = len(chunk)
                limit = codec.max_frame_size
                if window < limit:
                    limit = window
                if size > limit:
                    piece = chunk[:limit]
                    buf[0] = chunk[limit:]
                    size = limit
                else:
                    piece = buf.popleft()
                self.size -= size
                last = not buf and self.end_received and self.trailers is None
                codec.send_data(sid, piece, last)
                moved += size
                dst.queued(size)
                if last:
                    self.finished = True
            if not buf and self.end_received and not self.finished:
                if self.trailers is not None:
                    codec.send_headers(sid, self.trailers, True)
                else:
                    codec.end_stream(sid)
                self.finished = True
                dst.mark()
        except StreamClosed:
            self.finished = True  # the reset that closed it is handled by the exchange
            self.drop()
        if moved:
            self.sent += moved
            self.src.codec.ack(self.src_id, moved)
            self.src.mark()
        if self.finished:
            self.exchange.flow_finished()


class Exchange:
    """One request and its response; see the module docstring."""

    __slots__ = ("client", "done", "down", "endpoint", "grpc_status", "head_at", "obs",
                 "pending_reset", "request", "response_started", "retried", "server", "sid",
                 "started", "status", "target", "task", "timer", "uid", "up")

    def __init__(self, server: ServerConnection, sid: int, request: Request,
                 end_stream: bool) -> None:
        self.server = server
        self.sid = sid
        self.request = request
        self.up = Flow(self, server, sid)
        self.up.end_received = end_stream
        self.down: Flow | None = None
        self.client: ClientConnection | None = None
        self.uid = 0
        self.target: Target | None = None
        self.endpoint: EndpointRef | None = None
        self.obs: RequestObserver | None = None  # metrics and tap, from the first send
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.started = 0.0
        self.head_at = 0.0
        self.status = 0
        self.grpc_status: int | None = None
        self.response_started = False
        self.pending_reset: int | None = None
        self.retried = False
        self.done = False
        if request.timeout is not None and request.grpc:
            self.timer = asyncio.get_running_loop().call_later(request.timeout, self._deadline)

    # -- dispatch ------------------------------------------------------------------------

    def start(self, target: Target) -> None:
        """Route decided: attach to a pooled connection now, or dispatch in a task."""
        self.target = target
        now = monotonic()
        endpoint = target.pick(now, ())
        if endpoint is not None:
            conn = self.server.ctx.pool.ready(endpoint.key, endpoint.identity)
            if conn is not None and self._attach(conn, endpoint, now):
                return
        self.task = asyncio.get_running_loop().create_task(self._dispatch(endpoint))

    async def _dispatch(self, endpoint: EndpointRef | None) -> None:
        target = self.target
        assert target is not None
        ctx = self.server.ctx
        exclude: list[EndpointKey] = []
        last: ProxyError | None = None
        try:
            for _ in range(ctx.max_connect_attempts):
                if endpoint is None:
                    if last is not None:
                        raise last
                    endpoint = await target.wait_pick(exclude)
                try:
                    conn = await ctx.pool.get(endpoint.key, target.connect_timeout,
                                              endpoint.identity)
                except EndpointConnectError as error:
                    now = monotonic()
                    target.on_connect_error(endpoint, now)
                    exclude.append(endpoint.key)
                    last = error
                    endpoint = target.pick(now, exclude)
                    continue
                self.task = None
                if self.done:
                    return
                if not self._attach(conn, endpoint, monotonic()):
                    raise UpstreamReset("the upstream connection could not take the stream")
                return
            raise last or NoEndpoints("no endpoint could be reached")
        except ProxyError as error:
            self.task = None
            if not self.done:
                self.fail(error)
                self.server.mark()
        except Exception:  # a bug: the client still gets an answer, the log the trace
            log.exception("bug in the HTTP/2 dispatch path")
            self.task = None
            if not self.done:
                self.fail(UpstreamReset("internal error while dispatching the request"))
                self.server.mark()

    def _attach(self, conn: ClientConnection, endpoint: EndpointRef, now: float) -> bool:
        try:
            uid = conn.codec.new_stream_id()
        except StreamClosed:
            conn.retire()
            return False
        target = self.target
        assert target is not None
        up = self.up
        end = up.end_received and not up.buf and up.trailers is None
        try:
            conn.codec.send_headers(uid, self.request.headers, end)
        except StreamClosed:
            conn.retire()
            return False
        self.client = conn
        self.uid = uid
        conn.exchanges[uid] = self
        conn.mark()
        self.endpoint = endpoint
        self.started = now
        target.on_dispatch(endpoint, now)
        if self.obs is None:  # a retried request is counted once
            self.obs = self._observe(target, endpoint, now)
        down = self.down = Flow(self, conn, uid)
        down.dst = self.server
        down.dst_id = self.sid
        up.dst = conn
        up.dst_id = uid
        if end:
            up.finished = True
        else:
            up.pump()
        return True

    def _observe(self, target: Target | None, endpoint: EndpointRef | None,
                 now: float) -> RequestObserver:
        """Count the request on its series (by route: the gRPC method path, or the HTTP
        method and path template) and tap it if a session matches."""
        request = self.request
        conn = self.server.obs
        assert conn is not None
        return conn.request(target, endpoint, request.method, request.authority or b"",
                            request.path, request.headers, request.client_workload, now,
                            grpc=request.grpc)

    # -- client side events (server.py) -----------------------------------------------------

    def request_trailers(self, headers: Headers) -> None:
        _, trailers = scan_trailers(headers)
        self.up.end_with(trailers)

    def client_reset(self, code: int) -> None:
        """The client reset its stream: cancel the upstream one; not the endpoint's fault."""
        client = self.client
        if client is not None and not (self.down is not None and self.down.finished
                                       and self.up.finished):
            client.codec.reset(self.uid, CANCEL)
            client.mark()
        self.up.drop()
        self._complete(cancelled=True)

    # -- upstream events (client.py) ------------------------------------------------------

    def on_response(self, headers: Headers, end: bool) -> None:
        try:
            status, grpc_status, headers = scan_response(headers)
        except MalformedHeaders as error:
            client = self.client
            if client is not None:
                client.codec.reset(self.uid, PROTOCOL_ERROR)
            self.fail(UpstreamMalformed(f"malformed response from upstream: {error}"))
            return
        self.status = status
        now = self.head_at = monotonic()
        if end:
            self.grpc_status = grpc_status
        obs = self.obs
        if obs is not None:
            obs.response_start(status, headers, now)
        server = self.server
        try:
            server.codec.send_headers(self.sid, headers, end)
        except StreamClosed:
            return  # the client's reset is on its way
        self.response_started = True
        server.mark()
        if end:
            down = self.down
            assert down is not None
            down.end_received = down.finished = True
            self.flow_finished()

    def on_informational(self, headers: Headers) -> None:
        try:
            self.server.codec.send_headers(self.sid, headers, False)
        except StreamClosed:
            return
        self.server.mark()

    def on_trailers(self, headers: Headers) -> None:
        grpc_status, trailers = scan_trailers(headers)
        self.grpc_status = grpc_status
        down = self.down
        assert down is not None
        down.end_with(trailers)

    def upstream_reset(self, code: int) -> None:
        down = self.down
        assert down is not None
        if down.finished or down.end_received:
            # The response is complete: the reset only stops the request body.
            if not self.up.end_received:
                self.pending_reset = code
            self.up.finished = True
            self.up.drop()
            if down.finished:
                self.flow_finished()
            return
        if code == 0x7 and self.up.sent == 0 and not self.retried:  # REFUSED_STREAM
            self._retry()
            return
        self._reset_client(code)

    def upstream_failed(self, error: ProxyError, refused: bool) -> None:
        """The upstream connection died, or its GOAWAY left this stream out (refused)."""
        if self.done:
            return
        if refused and self.up.sent == 0 and not self.retried:
            self._retry()
            return
        if refused and not self.response_started:
            self._reset_client(0x7)  # REFUSED_STREAM: the client may send it again
            return
        self.fail(error)

    def _retry(self) -> None:
        """Send the request again on another connection (nothing of its body went up)."""
        self.retried = True
        if self.target is not None and self.endpoint is not None:
            now = monotonic()  # refused is not a failure of the endpoint
            self.target.on_complete(self.endpoint, now, now - self.started, True)
        self.endpoint = None
        self.started = 0.0
        client = self.client
        if client is not None:
            client.exchanges.pop(self.uid, None)
            client.blocked.discard(self.up)
            client.codec.reset(self.uid, CANCEL)
            client.mark()
            client.released()
        self.client = None
        self.up.dst = None
        self.up.finished = False
        self.down = None
        self.task = asyncio.get_running_loop().create_task(self._dispatch(None))

    # -- endings ---------------------------------------------------------------------------

    def flow_finished(self) -> None:
        down = self.down
        if down is None or not down.finished:
            return
        if not self.up.finished:
            if self.pending_reset is None:
                return  # the request body is still coming (bidi streaming)
            self.server.codec.reset(self.sid, self.pending_reset)
            self.server.mark()
        self._complete()

    def _reset_client(self, code: int) -> None:
        if self.down is not None:
            self.down.drop()
        self.server.codec.reset(self.sid, code)
        self.server.mark()
        client = self.client
        if client is not None:
            client.codec.reset(self.uid, CANCEL)
            client.mark()
        self.up.drop()
        self._complete(reset=error_name(code))

    def fail(self, error: ProxyError) -> None:
        """Answer ``error`` (before the response head), or end the stream (after)."""
        if self.done:
            return
        server = self.server
        client = self.client
        if client is not None:
            client.codec.reset(self.uid, CANCEL)
            client.mark()
        if self.response_started:
            down = self.down
            if down is not None:
                down.drop()
            if isinstance(error, DeadlineExceeded) and self.request.grpc:
                self._send_end([(b"grpc-status", b"%d" % grpc.DEADLINE_EXCEEDED),
                                (b"grpc-message", grpc.percent_encode(error.message))])
                self.grpc_status = grpc.DEADLINE_EXCEEDED
                reset = ""
            else:
                server.codec.reset(self.sid, INTERNAL_ERROR)
                self.status = self.status or 0
                reset = "INTERNAL_ERROR"
            self.up.drop()
            server.mark()
            self._complete(reset=reset)
            return
        headers, body = render_h2(error, self.request.grpc)
        if self.request.grpc:
            self.status = 200
            self.grpc_status = error.grpc_status if error.grpc_status is not None else (
                grpc.from_http(error.status))
        else:
            self.status = error.status
        # The proxy answered: counted (on the service's series when no endpoint was
        # reached) and tapped as the client sees it.
        now = monotonic()
        obs = self.obs
        if obs is None:
            obs = self.obs = self._observe(self.target, None, self.started or now)
        if self.request.grpc:
            obs.response_start(200, headers, now)  # trailers-only: grpc-status inside
            obs.response_end((), now)
        else:
            obs.fail(error.status, "", now)
        try:
            server.codec.send_headers(self.sid, headers, not body)
            if body and server.codec.send_window(self.sid) >= len(body):
                server.codec.send_data(self.sid, body, True)
            elif body:
                server.codec.reset(self.sid, NO_ERROR)
        except StreamClosed:
            pass
        if not self.up.end_received:
            server.codec.reset(self.sid, NO_ERROR)  # the answer is complete: stop the body
        self.up.drop()
        server.mark()
        self._complete(observed=True)

    def _send_end(self, trailers: Headers) -> None:
        try:
            self.server.codec.send_headers(self.sid, trailers, True)
        except StreamClosed:
            return
        if not self.up.end_received:
            self.server.codec.reset(self.sid, NO_ERROR)

    def _deadline(self) -> None:
        self.timer = None
        if not self.done:
            timeout = self.request.timeout or 0.0
            self.fail(DeadlineExceeded(f"grpc-timeout of {timeout:g}s passed"))

    def _complete(self, cancelled: bool = False, reset: str = "",
                  observed: bool = False) -> None:
        """The exchange is over: both streams freed, the balancer told, and metrics and
        tap told unless ``observed`` already (the proxy's own answer). ``reset`` names
        the reset that cut the stream; ``cancelled``: the client went away."""
        if self.done:
            return
        self.done = True
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        server = self.server
        server.exchanges.pop(self.sid, None)
        self.up.drop()
        if self.down is not None:
            server.blocked.discard(self.down)
            self.down.drop()
        client = self.client
        if client is not None:
            client.exchanges.pop(self.uid, None)
            client.blocked.discard(self.up)
        obs = self.obs
        if obs is not None and not observed:
            self._observe_end(obs, "CANCEL" if cancelled else reset)
        self._settle(cancelled)
        if client is not None:
            client.released()
        server.released()

    def _observe_end(self, obs: RequestObserver, reset: str) -> None:
        down = self.down
        if down is not None:
            obs.response_bytes = down.sent
        if reset:
            obs.fail(self.status, reset)
            return
        if self.grpc_status is not None:
            obs.grpc_status = self.grpc_status
        obs.response_end()

    def _settle(self, cancelled: bool) -> None:
        target, endpoint = self.target, self.endpoint
        if target is None or endpoint is None or not self.started:
            return
        now = monotonic()
        status = self.status
        if self.request.grpc:
            endpoint_ok = cancelled or (0 < status < 500 and grpc.endpoint_ok(self.grpc_status))
        else:
            endpoint_ok = cancelled or 0 < status < 500
        rtt = (self.head_at or now) - self.started
        target.on_complete(endpoint, now, rtt, endpoint_ok)
