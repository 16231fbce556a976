"""Accepting a connection: decide what it speaks (HTTP/2, HTTP/1 or opaque TCP) from its
first bytes, without ever stalling a protocol in which the server speaks first.

Linkerd waits up to 10 s for a client's first bytes, so NATS, MySQL or SMTP through it
stall for 10 s (linkerd2 #13364). Shoal avoids that: when the caller can name the upstream
(the inbound side, port-mapped upstreams, a transparent original destination), ``classify``
connects to it *while* it waits for the client, and whichever side speaks first decides.
If the server speaks first the connection is opaque at once and its bytes are handed back
for relaying; if the client speaks first its bytes go through ``shoal.proxy.detect``. One
exception: an HTTP/2 server may send its SETTINGS before the client's preface (gRPC
servers do), which says nothing about the client; those bytes are held and detection
waits for the client (they come back as ``upstream_data`` whatever it decides). Only a
silent client with a silent server waits for the timeout, and nothing is lost by waiting
because neither side has anything to say (then the connection is opaque).

The caller owns the client socket throughout; it owns the upstream socket in the result
(use it, for example ``loop.create_connection(factory, sock=upstream)``, or close it).
Readiness is watched with ``loop.add_reader`` (level-triggered), never with a cancelled
``sock_recv``, so no byte can be lost when detection ends; this works on uvloop too.

With ``tls=True`` (the inbound side) a TLS ClientHello is recognised first
(``detect.detect_tls``), on opaque ports too: a meshed peer always opens with one, and
what follows it is decided after the handshake (proxy/inbound.py).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Literal

from .detect import MAX_DETECT_BYTES, Protocol, detect, detect_tls, is_http2_server_preface

# One read of whatever a server sent first (a NATS INFO line is ~300 bytes, a MySQL
# handshake ~100); anything after it is relayed by forward_opaque. 64 KiB = one recv.
SERVER_FIRST_READ_BYTES: Final = 64 * 1024

# A backstop on awaiting connect_upstream(), which should bound its own connect (Linkerd
# uses 1 s outbound and 100 ms inbound); this only keeps a broken connector from hanging
# the accept.
CONNECT_BACKSTOP_SECONDS: Final = 5.0

Reason = Literal["detected", "opaque-port", "server-first", "client-eof", "timeout"]

Connector = Callable[[], Awaitable[socket.socket]]


class ClientReset(ConnectionError):
    """The client reset or broke its connection before its protocol was known (the
    client's fault; close the socket, there is nobody to answer)."""


@dataclass(frozen=True, slots=True)
class Classified:
    """What ``classify`` found out about a connection.

    protocol: what to do with it. client_data: bytes already read from the client (replay
    them first). reason: why (``detected`` from the client's bytes, ``opaque-port``
    configured, ``server-first``, ``client-eof`` before a decision, ``timeout``).
    upstream: the connected upstream socket when a connector was given and it connected
    (the caller owns it, whatever the protocol). upstream_data: bytes the server sent first
    (relay them to the client first). upstream_error: why the connector failed, if it did.
    """

    protocol: Protocol
    client_data: bytes
    reason: Reason
    upstream: socket.socket | None = None
    upstream_data: bytes = b""
    upstream_error: OSError | None = None


async def classify(
    loop: asyncio.AbstractEventLoop,
    client_sock: socket.socket,
    *,
    opaque: bool,
    connect_upstream: Connector | None,
    timeout: float,
    tls: bool = False,
) -> Classified:
    """Decide the protocol of the accepted, non-blocking ``client_sock``.

    ``opaque``: the port is configured opaque, skip detection (but with ``tls``, still
    recognise a ClientHello: anything else is opaque). ``tls``: a connection that opens
    with a TLS ClientHello is ``tls``. ``connect_upstream``: opens
    the upstream connection (non-blocking socket); given, it is started at once, in
    parallel with reading the client, so a server that speaks first is seen at once.
    ``timeout``: how long to wait for a silent client (DETECT_TIMEOUT_SECONDS is the
    default policy); then the connection is opaque. Raises ClientReset if the client breaks
    the connection before a decision; never leaks the upstream socket.
    """
    if opaque and not tls:
        upstream, error = await _await_connect(connect_upstream) if connect_upstream else (
            None, None)
        return Classified("opaque", b"", "opaque-port", upstream, b"", error)
    return await _Detection(loop, client_sock, connect_upstream, timeout, tls=tls,
                            opaque=opaque).run()


async def connect_tcp(
    loop: asyncio.AbstractEventLoop, host: str, port: int, timeout: float
) -> socket.socket:
    """A connected non-blocking TCP socket with TCP_NODELAY, or OSError (TimeoutError after
    ``timeout``). A convenience connector for ``classify``."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


class _Detection:
    """One connection's detection: a loop over readiness of the client, the upstream and
    the pending connect, until one of them decides."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        connect_upstream: Connector | None,
        timeout: float,
        *,
        tls: bool = False,
        opaque: bool = False,
    ) -> None:
        self.loop = loop
        self.client = client
        self.tls = tls
        self.opaque = opaque
        self.deadline = loop.time() + timeout
        self.buffer = bytearray()
        self.upstream: socket.socket | None = None
        self.upstream_error: OSError | None = None
        self.held = b""  # an HTTP/2 server's preface, sent before the client spoke
        self.connecting: asyncio.Task[socket.socket] | None = None
        if connect_upstream is not None:
            self.connecting = loop.create_task(_call(connect_upstream))

    async def run(self) -> Classified:
        try:
            result = await self._detect()
        except BaseException:
            await self._drop_upstream()
            raise
        if result.upstream is None:
            await self._drop_upstream()
        return result

    async def _detect(self) -> Classified:
        while True:
            ready = await self._wait()
            if self.connecting is not None and self.connecting.done():
                self._take_connect(self.connecting)
            if self.upstream is not None and self.upstream in ready:
                result = self._read_upstream()
                if result is not None:
                    return result
            if self.client in ready:
                result = await self._read_client()
                if result is not None:
                    return result
            if not ready and self.loop.time() >= self.deadline:
                return await self._finish("opaque", "timeout")

    async def _wait(self) -> set[socket.socket]:
        """Wait until a watched socket is readable, the connect finishes or the deadline."""
        waiter = self.loop.create_future()
        ready: set[socket.socket] = set()

        def wake(_: object = None) -> None:
            if not waiter.done():
                waiter.set_result(None)

        def on_readable(sock: socket.socket) -> None:
            ready.add(sock)
            wake()

        watched = ([self.client] if self.upstream is None or self.held
                   else [self.client, self.upstream])
        for sock in watched:
            self.loop.add_reader(sock.fileno(), on_readable, sock)
        if self.connecting is not None:
            self.connecting.add_done_callback(wake)
        timer = self.loop.call_at(self.deadline, wake)
        try:
            await waiter
        finally:
            timer.cancel()
            for sock in watched:
                self.loop.remove_reader(sock.fileno())
            if self.connecting is not None:
                self.connecting.remove_done_callback(wake)
        return ready

    def _take_connect(self, task: asyncio.Task[socket.socket]) -> None:
        self.connecting = None
        try:
            self.upstream = task.result()
        except OSError as error:
            self.upstream_error = error

    def _read_upstream(self) -> Classified | None:
        """The server spoke (or closed) first: opaque. None on a spurious wakeup."""
        assert self.upstream is not None
        try:
            data = self.upstream.recv(SERVER_FIRST_READ_BYTES)
        except BlockingIOError:
            return None
        except OSError as error:  # reset before it said anything: no upstream after all
            self.upstream.close()
            self.upstream, self.upstream_error = None, error
            return None
        if is_http2_server_preface(data):  # not a server-first protocol: ask the client
            self.held = data
            return None
        return self._result("opaque", "server-first", data)

    async def _read_client(self) -> Classified | None:
        try:
            data = self.client.recv(MAX_DETECT_BYTES - len(self.buffer))
        except BlockingIOError:
            return None
        except OSError as error:
            raise ClientReset(f"client connection broken during detection: {error}") from error
        if not data:  # half-closed before a decision: relay what there is, transparently
            return await self._finish("opaque", "client-eof")
        self.buffer += data
        protocol = self._decide(bytes(self.buffer))
        if protocol is None:
            return None
        return await self._finish(protocol, "opaque-port" if protocol == "opaque" and
                                  self.opaque else "detected")

    def _decide(self, data: bytes) -> Protocol | None:
        if self.tls:
            hello = detect_tls(data)
            if hello:
                return "tls"
            if hello is None:
                return None
        if self.opaque:
            return "opaque"
        return detect(data)

    async def _finish(self, protocol: Protocol, reason: Reason) -> Classified:
        if protocol in ("opaque", "tls"):
            # Opaque needs the upstream; TLS (a peer proxy) will need it once the
            # handshake is done, which takes longer than a connect: wait for it.
            if self.connecting is not None:
                task, self.connecting = self.connecting, None
                self.upstream, self.upstream_error = await _await_connect_task(task)
            return self._result(protocol, reason)
        # HTTP: do not wait for a slow connect; the HTTP layer has its own pool.
        if self.connecting is not None and self.connecting.done():
            self._take_connect(self.connecting)
        if self.upstream is not None:
            early = _server_spoke(self.upstream)
            if self.held and protocol == "http2":  # an HTTP/2 server for an HTTP/2 client
                self.held += early
            elif early or self.held:
                # An HTTP/1 server never speaks first, and an HTTP/2 server does not suit
                # an HTTP/1 client: whatever this is, relay it.
                self.held += early
                return self._result("opaque", "server-first")
        return self._result(protocol, reason)

    def _result(self, protocol: Protocol, reason: Reason, upstream_data: bytes = b"") -> Classified:
        return Classified(protocol, bytes(self.buffer), reason, self.upstream,
                          self.held + upstream_data, self.upstream_error)

    async def _drop_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        if self.connecting is not None:
            task, self.connecting = self.connecting, None
            task.cancel()
            await asyncio.wait({task})  # an outer cancellation still propagates from here
            if not task.cancelled() and task.exception() is None:
                task.result().close()  # it connected just as it was cancelled


async def _call(connect_upstream: Connector) -> socket.socket:
    async with asyncio.timeout(CONNECT_BACKSTOP_SECONDS):
        return await connect_upstream()


async def _await_connect(
    connect_upstream: Connector,
) -> tuple[socket.socket | None, OSError | None]:
    try:
        return await _call(connect_upstream), None
    except OSError as error:  # includes TimeoutError
        return None, error


async def _await_connect_task(
    task: asyncio.Task[socket.socket],
) -> tuple[socket.socket | None, OSError | None]:
    try:
        return await task, None
    except OSError as error:
        return None, error


def _server_spoke(upstream: socket.socket) -> bytes:
    """Bytes the upstream has already sent (consumed), or b"" if none (or it closed: the
    HTTP layer finds that out by itself)."""
    try:
        peeked = upstream.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, OSError):
        return b""
    if not peeked:
        return b""
    try:
        return upstream.recv(SERVER_FIRST_READ_BYTES)
    except OSError:
        return b""
