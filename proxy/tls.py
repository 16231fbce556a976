"""Mutual TLS between proxies: the protocol names offered in ALPN, the ClientHello reader
that tells a peer proxy's TLS from an application's own, the metric labels of each case,
and the TLS layer the proxy runs over its sockets.

Between two Shoal proxies every connection is TLS 1.3 with both certificates checked
(proxy/identity.py builds the contexts). The client offers exactly one ALPN protocol,
which tells the server proxy what the plaintext inside is, so the server needs no
detection after the handshake:

- ``h2``: HTTP/2 (the HTTP/2 engine's connections);
- ``shoal.http1``: HTTP/1.1 requests, as the client proxy's HTTP/1 engine sends them;
- ``shoal.opaque``: opaque TCP bytes for the application port (port-mapped upstreams,
  opaque ports); the server proxy connects to the app at once and relays, so protocols
  in which the server speaks first work through it.
A client that offers none of them (a TLS client with a mesh certificate that is not a
Shoal proxy) gets detection on the decrypted bytes (HTTP/1, HTTP/2, else opaque).

The inbound side terminates TLS only when the ClientHello's SNI is the proxy's own
identity (the client proxy sends the identity discovery gave it, as Linkerd's does);
any other TLS is the application's own and is relayed untouched.

The TLS layer (``TlsConnection`` + ``TlsTransport``) is OpenSSL through
``ssl.SSLObject`` over memory BIOs, driven by an ``asyncio.Protocol`` on the raw
socket, and presents the plaintext as an ``asyncio.Transport`` to the protocol above
it (the HTTP/1 engine, the relay). It exists, rather than asyncio's or uvloop's
``ssl=`` transports, for three things they do not give: the bytes detection already
read (the ClientHello) are fed to the handshake; the application protocol is chosen
after the handshake, from ALPN; and a half-close travels through TLS (TLS 1.3
close_notify closes one direction only, RFC 8446 6.1), which opaque TCP needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import dataclass
from typing import Any, Final, Protocol, cast

# --- ALPN ------------------------------------------------------------------------------

ALPN_HTTP2: Final = "h2"
ALPN_HTTP1: Final = "shoal.http1"
ALPN_OPAQUE: Final = "shoal.opaque"
# What an inbound proxy accepts, in its order of preference (a client offers one).
SERVER_ALPN: Final = (ALPN_HTTP2, ALPN_HTTP1, ALPN_OPAQUE)

# --- limits ----------------------------------------------------------------------------

# A handshake is two round trips plus a few signatures (~1 ms on loopback). 5 s covers a
# congested network and a busy peer; past it the connection attempt is a failure.
TLS_HANDSHAKE_TIMEOUT_SECONDS: Final = 5.0
# TLSPlaintext.length is at most 2^14 (RFC 8446 5.1): one ClientHello record plus its
# 5-byte header is all the inbound side reads before deciding.
MAX_CLIENT_HELLO_BYTES: Final = 5 + 16384
# SSLObject.read() size: one record's plaintext at most (2^14). Larger sizes cost a big
# allocation per call for nothing, since OpenSSL returns one record per read.
TLS_RECORD_BYTES: Final = 16384
# Plaintext handed to the protocol above per delivery: reads are joined up to this, the
# same bound as the opaque forwarder's buffer (opaque.COPY_BUFFER_BYTES).
TLS_DELIVERY_BYTES: Final = 256 * 1024

# --- metric labels (Linkerd's ``tls`` / ``client_id`` / ``server_id`` / ``no_tls_reason``)

TLS_DISABLED: Final = {"tls": "no_identity", "no_tls_reason": "disabled"}
TLS_LOOPBACK: Final = {"tls": "no_identity", "no_tls_reason": "loopback"}
TLS_NO_TLS_FROM_REMOTE: Final = {"tls": "no_identity", "no_tls_reason": "no_tls_from_remote"}
TLS_NOT_PROVIDED_BY_DISCOVERY: Final = {
    "tls": "no_identity", "no_tls_reason": "not_provided_by_service_discovery"}
# The application's own TLS relayed through the inbound side (its SNI is not ours).
TLS_PASSTHROUGH: Final = {"tls": "opaque"}


def server_id_labels(identity: str) -> dict[str, str]:
    """An outbound connection with TLS to a peer proxy that proved ``identity``."""
    return {"tls": "true", "server_id": identity}


def client_id_labels(identity: str) -> dict[str, str]:
    """An inbound connection terminated here from a client that proved ``identity``."""
    return {"tls": "true", "client_id": identity}


def outbound_labels(endpoint_identity: str, tls_enabled: bool) -> dict[str, str]:
    """Labels of an outbound connection to an endpoint discovery gave this identity."""
    if not tls_enabled:
        return dict(TLS_DISABLED)
    if not endpoint_identity:
        return dict(TLS_NOT_PROVIDED_BY_DISCOVERY)
    return server_id_labels(endpoint_identity)


# --- the ClientHello ---------------------------------------------------------------------


class MalformedClientHello(ValueError):
    """Bytes that start like a ClientHello but do not parse as one (RFC 8446 4.1.2)."""


@dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: str | None  # the SNI host_name, lowercase; None without one
    alpn: tuple[str, ...]  # the protocols offered, in the client's order


_EXTENSION_SERVER_NAME: Final = 0  # RFC 6066 3
_EXTENSION_ALPN: Final = 16  # RFC 7301 3.1
_SNI_HOST_NAME: Final = 0


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, size: int) -> bytes:
        if size > self.remaining:
            raise MalformedClientHello("a length runs past the end of the ClientHello")
        chunk = self.data[self.pos:self.pos + size]
        self.pos += size
        return chunk

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")


def parse_client_hello(data: bytes) -> ClientHello | None:
    """The SNI and ALPN of the ClientHello that ``data`` starts with; None until the
    whole first record is there. The ClientHello must fit in that record (every client
    sends it in one: it is a few hundred bytes, the record limit is 16 KiB)."""
    if len(data) < 5:
        return None
    if data[0] != 0x16 or data[1] != 0x03:
        raise MalformedClientHello("not a TLS handshake record")
    length = int.from_bytes(data[3:5], "big")
    if length > MAX_CLIENT_HELLO_BYTES - 5:
        raise MalformedClientHello(f"record of {length} bytes, over the TLS limit")
    if len(data) < 5 + length:
        return None
    record = _Reader(data[5:5 + length])
    if record.number(1) != 0x01:
        raise MalformedClientHello("the first handshake message is not a ClientHello")
    size = record.number(3)
    if size > record.remaining:
        raise MalformedClientHello("the ClientHello is split over several records")
    hello = _Reader(record.take(size))
    hello.take(2 + 32)  # legacy_version, random
    hello.take(hello.number(1))  # legacy_session_id
    hello.take(hello.number(2))  # cipher_suites
    hello.take(hello.number(1))  # legacy_compression_methods
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    if hello.remaining:
        extensions = _Reader(hello.take(hello.number(2)))
        while extensions.remaining:
            kind = extensions.number(2)
            body = extensions.take(extensions.number(2))
            if kind == _EXTENSION_SERVER_NAME:
                server_name = _server_name(body)
            elif kind == _EXTENSION_ALPN:
                alpn = _alpn(body)
    return ClientHello(server_name, alpn)


def _server_name(body: bytes) -> str | None:
    reader = _Reader(body)
    names = _Reader(reader.take(reader.number(2)))
    while names.remaining:
        kind = names.number(1)
        name = names.take(names.number(2))
        if kind == _SNI_HOST_NAME:
            try:
                return name.decode("ascii").lower()
            except UnicodeDecodeError:
                raise MalformedClientHello("the server name is not ASCII") from None
    return None


def _alpn(body: bytes) -> tuple[str, ...]:
    reader = _Reader(body)
    protocols = _Reader(reader.take(reader.number(2)))
    offered = []
    while protocols.remaining:
        offered.append(protocols.take(protocols.number(1)).decode("latin-1"))
    return tuple(offered)


# --- what the proxy's identity provides ----------------------------------------------------


class ClientTls(Protocol):
    """The TLS client side a pool needs (proxy.identity.IdentityClient provides it): the
    newest client context, offering ``alpn``; raises identity.IdentityError before the
    first certificate."""

    def client_context(self, alpn: tuple[str, ...] | None = None) -> ssl.SSLContext: ...


# --- the TLS layer ----------------------------------------------------------------------------


class TlsConnection(asyncio.Protocol):
    """OpenSSL over memory BIOs on one raw connection (see the module docstring).

    Lifecycle: the raw transport is made (``connection_made``) and the handshake runs
    (``handshake`` resolves, or fails with the ``ssl.SSLError`` / ``ConnectionError``);
    reading then pauses until the owner calls ``attach(protocol)`` with the protocol
    that gets the plaintext through ``transport``. Plaintext that arrived in the
    meantime waits in the BIO and is delivered after ``connection_made``.

    EOF: the peer's close_notify is the plaintext EOF (``eof_received`` above); a raw
    EOF without one is a truncation and aborts the connection. ``write_eof`` sends
    close_notify, then a TCP FIN; reading goes on (TLS 1.3 half-close).
    """

    def __init__(self, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None, initial: bytes = b"") -> None:
        self.loop = asyncio.get_running_loop()
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(self._incoming, self._outgoing,
                                           server_side=server_side,
                                           server_hostname=server_hostname)
        # The C object under ssl.SSLObject: reading and writing through it directly skips
        # a Python frame per call on the hot path (ssl.SSLObject.read/write only forward).
        self._sslobj: Any = getattr(self.ssl_object, "_sslobj", self.ssl_object)
        self._initial = initial
        self.handshake: asyncio.Future[None] = self.loop.create_future()
        self.handshake.add_done_callback(_retrieve)
        self.transport = TlsTransport(self)
        self.raw: asyncio.Transport | None = None
        self.app: asyncio.BaseProtocol | None = None
        self.app_paused = False  # the protocol above asked to pause reading
        self.read_scheduled = False
        self.eof_in = False  # the peer's close_notify was delivered as EOF
        self.eof_out = False  # our close_notify was sent
        self.eof_out_wanted = False  # write_eof waits for unread bytes to be read first
        self.closing = False
        self.lost = False

    # -- raw side (asyncio calls these) -----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = cast(asyncio.Transport, transport)
        if self._initial:
            self._incoming.write(self._initial)
            self._initial = b""
        self._do_handshake()

    def data_received(self, data: bytes) -> None:
        self._incoming.write(data)
        if self.app is not None:  # attached: the handshake is done (the hot path)
            if not self.app_paused:
                self._read()
        elif not self.handshake.done():
            self._do_handshake()

    def eof_received(self) -> bool:
        self._incoming.write_eof()
        if not self.handshake.done():
            self._do_handshake()  # fails: EOF in the middle of the handshake
            return False
        if self.app is not None and not self.app_paused:
            self._read()  # a truncation (no close_notify) surfaces here as an error
        return not (self.closing or self.lost)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.handshake.done():
            self.handshake.set_exception(
                exc or ConnectionResetError("connection closed during the TLS handshake"))
        app = self.app
        if app is not None:
            self.app = None
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()

    # -- handshake ------------------------------------------------------------------------

    def _do_handshake(self) -> None:
        try:
            self.ssl_object.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as error:
            self._flush()  # the alert, so the peer learns why
            if not self.handshake.done():
                self.handshake.set_exception(error)
            self.closing = True
            assert self.raw is not None
            self.raw.close()
            return
        self._flush()
        assert self.raw is not None
        self.raw.pause_reading()  # until attach(): nothing above to deliver to yet
        if not self.handshake.done():
            self.handshake.set_result(None)

    def attach(self, app: asyncio.BaseProtocol) -> None:
        """Hand the plaintext to ``app`` (after a successful handshake)."""
        self.app = app
        app.connection_made(self.transport)
        if self.lost or self.closing:
            return
        if not self.app_paused:
            assert self.raw is not None
            self.raw.resume_reading()
            self._read()

    def abort(self) -> None:
        self.closing = True
        if self.raw is not None:
            self.raw.abort()

    # -- moving bytes ---------------------------------------------------------------------

    def _flush(self) -> None:
        if self._outgoing.pending and self.raw is not None and not self.lost:
            self.raw.write(self._outgoing.read())

    def _read(self) -> None:
        """Deliver the plaintext waiting in the BIO while the protocol above reads."""
        self.read_scheduled = False
        read = self._sslobj.read
        incoming = self._incoming
        pending = self._sslobj.pending
        while self.app is not None and not self.app_paused and not self.eof_in:
            chunks: list[bytes] = []
            size = 0
            eof = False
            failure: ssl.SSLError | None = None
            try:
                while size < TLS_DELIVERY_BYTES:
                    chunk = read(TLS_RECORD_BYTES)
                    if not chunk:
                        eof = True
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                    if not incoming.pending and not pending():
                        break  # all read, without paying for an SSLWantReadError
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:  # close_notify (read() may also return b"")
                eof = True
            except ssl.SSLError as error:  # a truncation, a bad record, an alert
                failure = error
            if chunks:
                cast(asyncio.Protocol, self.app).data_received(
                    chunks[0] if len(chunks) == 1 else b"".join(chunks))
            if failure is not None:
                self._flush()
                self.abort()
                return
            if eof:
                self._peer_closed()
                break
            if not chunks or not incoming.pending:
                break
        if self._outgoing.pending:  # reading may answer (a KeyUpdate, say)
            self._flush()
        if self.eof_out_wanted and not incoming.pending:
            self._send_close_notify()

    def _peer_closed(self) -> None:
        self.eof_in = True
        app = self.app
        keep_open = bool(app is not None and cast(asyncio.Protocol, app).eof_received())
        if self.eof_out or not keep_open:
            self.transport.close()

    def _send_close_notify(self) -> None:
        self.eof_out_wanted = False
        self.eof_out = True
        with contextlib.suppress(ssl.SSLError):  # WantRead: the peer's comes later
            self.ssl_object.unwrap()
        self._flush()
        raw = self.raw
        if raw is not None and not self.lost and raw.can_write_eof():
            raw.write_eof()
        if self.eof_in:  # both directions have ended
            self.transport.close()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data or self.eof_out or self.closing or self.lost or self.raw is None:
            return
        written = self._sslobj.write(data)
        if written < len(data):  # partial writes are not enabled, but be sure
            view = memoryview(data)[written:]
            while view:
                view = view[self._sslobj.write(view):]
        self.raw.write(self._outgoing.read())

    def write_eof(self) -> None:
        if self.eof_out or self.eof_out_wanted or self.closing or self.lost:
            return
        # Shutting down with unread records in the BIO would make OpenSSL read (and
        # refuse) them; send close_notify once they have been read (_read).
        self.eof_out_wanted = True
        if not self._incoming.pending:
            self._send_close_notify()

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.handshake.done() and not self.lost and not self.eof_out:
            self.eof_out = True
            with contextlib.suppress(ssl.SSLError):
                self.ssl_object.unwrap()
            self._flush()
        if self.raw is not None:
            self.raw.close()

    def pause_reading(self) -> None:
        self.app_paused = True
        if self.raw is not None and not self.lost:
            self.raw.pause_reading()

    def resume_reading(self) -> None:
        if not self.app_paused:
            return
        self.app_paused = False
        if self.raw is not None and not self.lost and not self.closing:
            self.raw.resume_reading()
            if not self.read_scheduled:
                # Records read while paused wait in the BIO; deliver them from the loop,
                # not from inside whatever called resume_reading.
                self.read_scheduled = True
                self.loop.call_soon(self._read)


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a failed handshake's exception as seen (its owner may have stopped waiting)."""
    if not future.cancelled():
        future.exception()


class TlsTransport(asyncio.Transport):
    """The plaintext side of a ``TlsConnection``, for the protocol above it."""

    def __init__(self, connection: TlsConnection) -> None:
        super().__init__()
        self._conn = connection
        self.write = connection.write  # type: ignore[method-assign]  # one call, not two

    @property
    def connection(self) -> TlsConnection:
        return self._conn

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._conn.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._conn.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        self._conn.write_eof()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self._conn.close()

    def abort(self) -> None:
        self._conn.abort()

    def is_closing(self) -> bool:
        conn = self._conn
        raw = conn.raw
        return conn.closing or conn.lost or raw is None or raw.is_closing()

    def pause_reading(self) -> None:
        self._conn.pause_reading()

    def resume_reading(self) -> None:
        self._conn.resume_reading()

    def is_reading(self) -> bool:
        return not self._conn.app_paused

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        raw = self._conn.raw
        if raw is not None:
            raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        raw = self._conn.raw
        return raw.get_write_buffer_size() if raw is not None else 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        raw = self._conn.raw
        return raw.get_write_buffer_limits() if raw is not None else (0, 0)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._conn.app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return cast(asyncio.BaseProtocol, self._conn.app)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        conn = self._conn
        if name == "ssl_object":
            return conn.ssl_object
        if name == "peercert":
            return conn.ssl_object.getpeercert()
        if name == "cipher":
            return conn.ssl_object.cipher()
        if name == "sslcontext":
            return conn.ssl_object.context
        if name == "alpn_protocol":
            return conn.ssl_object.selected_alpn_protocol()
        if conn.raw is None:
            return default
        return conn.raw.get_extra_info(name, default)


# --- starting TLS on a connected socket ---------------------------------------------------------


async def _handshake(connection: TlsConnection, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            await asyncio.shield(connection.handshake)
    except BaseException:
        connection.abort()
        raise


async def originate(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                    context: ssl.SSLContext, server_identity: str,
                    timeout: float = TLS_HANDSHAKE_TIMEOUT_SECONDS) -> TlsConnection:
    """TLS client on the connected ``sock``, expecting ``server_identity`` (sent as SNI;
    OpenSSL checks the certificate's DNS SAN against it). Raises ``ssl.SSLError``
    (``SSLCertVerificationError`` for a certificate that is not for that identity),
    ``ConnectionError`` or ``TimeoutError``; the socket is closed on failure."""
    connection = TlsConnection(context, server_side=False, server_hostname=server_identity)
    try:
        await loop.create_connection(lambda: connection, sock=sock)
    except BaseException:
        sock.close()
        raise
    await _handshake(connection, timeout)
    return connection


async def terminate(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                    context: ssl.SSLContext, initial: bytes,
                    timeout: float = TLS_HANDSHAKE_TIMEOUT_SECONDS) -> TlsConnection:
    """TLS server on the accepted ``sock``; ``initial``: the bytes detection already read
    (the ClientHello). Raises as ``originate``; the socket is closed on failure."""
    connection = TlsConnection(context, server_side=True, initial=initial)
    try:
        await loop.connect_accepted_socket(lambda: connection, sock)
    except BaseException:
        sock.close()
        raise
    await _handshake(connection, timeout)
    return connection


async def read_client_hello(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                            initial: bytes, timeout: float) -> tuple[bytes, ClientHello | None]:
    """Read on from ``initial`` until the first TLS record is complete: (every byte
    read, the ClientHello or None when it does not parse). ``TimeoutError`` or
    ``ConnectionError`` when the client stalls or goes away first."""
    data = initial
    async with asyncio.timeout(timeout):
        while True:
            try:
                hello = parse_client_hello(data)
            except MalformedClientHello:
                return data, None
            if hello is not None:
                return data, hello
            more = await loop.sock_recv(sock, MAX_CLIENT_HELLO_BYTES - len(data))
            if not more:
                raise ConnectionResetError("the client closed during its ClientHello")
            data += more
