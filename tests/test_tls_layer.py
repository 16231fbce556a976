"""The proxy's TLS layer (shoal.proxy.tls) and the transport relay (shoal.proxy.relay),
without the bus: ClientHello parsing on what OpenSSL really sends, TLS detection, and
real TLS 1.3 over loopback sockets with certificates from a test hierarchy made by
shoal.kernel.pki: mutual authentication, ALPN, identity checks, half-close through TLS,
backpressure with a large transfer, and a relay between plaintext and TLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import socket
import ssl
import time

import pytest

from shoal.kernel import pki
from shoal.proxy import tls
from shoal.proxy.detect import detect, detect_tls
from shoal.proxy.dial import handshake_errors
from shoal.proxy.errors import UpstreamIdentityMismatch
from shoal.proxy.identity import Credentials, IdentityConfig, build_contexts, peer_identity
from shoal.proxy.relay import Relay

from .netutil import LOOPBACK, Counters, echo, recv_all, tcp_pair, tcp_server

SCHEME = pki.NameScheme()
IO_TIMEOUT = 20.0


class Mesh:
    """An anchor, an issuer, and contexts for workloads signed by them."""

    def __init__(self) -> None:
        now = dt.datetime.now(dt.UTC)
        self.anchor = pki.make_anchor(SCHEME, 1, now)
        self.issuer = pki.Issuer(pki.make_issuer(SCHEME, self.anchor, 1, now))

    def contexts(self, serviceaccount: str, alpn: tuple[str, ...] = tls.SERVER_ALPN
                 ) -> tuple[str, ssl.SSLContext, ssl.SSLContext]:
        now = dt.datetime.now(dt.UTC)
        identity = SCHEME.identity(serviceaccount, "ns")
        key = pki.generate_key()
        leaf = self.issuer.sign(key.public_key(), identity, dt.timedelta(hours=1), now)
        creds = Credentials(identity, leaf.cert, pki.bundle_pem([leaf.cert, self.issuer.cert]),
                            leaf.serial, leaf.not_after.timestamp(), time.time())
        server, client = build_contexts(creds, key, pki.cert_to_pem(self.anchor.cert),
                                        IdentityConfig(identity, alpn_protocols=alpn))
        return identity, server, client


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return Mesh()


def _client_hello(context: ssl.SSLContext, server_name: str) -> bytes:
    obj = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_side=False,
                           server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# -- plain code -------------------------------------------------------------------------------


def test_client_hello_parsed_from_what_openssl_sends(mesh: Mesh) -> None:
    identity, _, client = mesh.contexts("web", (tls.ALPN_HTTP1,))
    hello_bytes = _client_hello(client, identity)
    assert detect_tls(hello_bytes) is True
    assert detect(hello_bytes) == "opaque"  # only the inbound side asks about TLS
    hello = tls.parse_client_hello(hello_bytes)
    assert hello == tls.ClientHello(server_name=identity, alpn=(tls.ALPN_HTTP1,))
    # Every strict prefix needs more bytes; nothing is decided early.
    for cut in range(len(hello_bytes)):
        assert tls.parse_client_hello(hello_bytes[:cut]) is None
    # A plain TLS client without SNI or ALPN.
    bare = ssl.create_default_context()
    bare.check_hostname = False
    anonymous = bare.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_side=False)
    with pytest.raises(ssl.SSLWantReadError):
        anonymous.do_handshake()
    assert tls.parse_client_hello(out.read()) == tls.ClientHello(None, ())


def test_client_hello_refuses_garbage() -> None:
    with pytest.raises(tls.MalformedClientHello):
        tls.parse_client_hello(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00")  # ServerHello
    with pytest.raises(tls.MalformedClientHello):
        tls.parse_client_hello(b"\x16\x03\x01\x00\x06\x01\x00\x00\xff\x03\x03")  # too long
    with pytest.raises(tls.MalformedClientHello):
        tls.parse_client_hello(b"\x16\x03\x01\xff\xff")  # a record over 16 KiB
    with pytest.raises(tls.MalformedClientHello):
        tls.parse_client_hello(b"GET / HTTP/1.1\r\n")


@pytest.mark.parametrize(("data", "verdict"), [
    (b"", None), (b"\x16", None), (b"\x16\x03", None), (b"\x16\x03\x01\x02\x00", None),
    (b"\x16\x03\x01\x02\x00\x01", True), (b"\x16\x03\x03\x00\x10\x01rest", True),
    (b"\x17\x03\x03", False), (b"\x16\x02", False), (b"\x16\x03\x09", False),
    (b"\x16\x03\x01\x02\x00\x02", False), (b"GET / HTTP/1.1\r\n", False),
    (b"PRI * HTTP/2.0\r\n", False),
])
def test_detect_tls(data: bytes, verdict: bool | None) -> None:
    assert detect_tls(data) is verdict


def test_labels() -> None:
    assert tls.outbound_labels("a.b", True) == {"tls": "true", "server_id": "a.b"}
    assert tls.outbound_labels("", True)["no_tls_reason"] == \
        "not_provided_by_service_discovery"
    assert tls.outbound_labels("a.b", False)["no_tls_reason"] == "disabled"
    assert tls.client_id_labels("c.d") == {"tls": "true", "client_id": "c.d"}


# -- TLS over loopback -------------------------------------------------------------------------


class Recorder(asyncio.Protocol):
    """A protocol above TlsTransport that keeps what it got and can echo it."""

    def __init__(self, echo_back: bool = False, keep_open_on_eof: bool = True) -> None:
        self.data = bytearray()
        self.eof = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()
        self.echo_back = echo_back
        self.keep_open_on_eof = keep_open_on_eof
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.echo_back:
            assert self.transport is not None
            self.transport.write(data)

    def eof_received(self) -> bool:
        if not self.eof.done():
            self.eof.set_result(None)
        if self.echo_back and self.transport is not None:
            self.transport.write_eof()
        return self.keep_open_on_eof

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


async def _pair(mesh: Mesh, server_sa: str = "voting", expect_sa: str = "voting",
                alpn: tuple[str, ...] = (tls.ALPN_OPAQUE,)
                ) -> tuple[tls.TlsConnection, tls.TlsConnection, str]:
    loop = asyncio.get_running_loop()
    _, _, client_ctx = mesh.contexts("web", alpn)
    _, server_ctx, _ = mesh.contexts(server_sa)
    outside, accepted = await tcp_pair()
    expected = SCHEME.identity(expect_sa, "ns")
    async with asyncio.timeout(IO_TIMEOUT):
        results = await asyncio.gather(
            tls.originate(loop, outside, client_ctx, expected),
            tls.terminate(loop, accepted, server_ctx, b""), return_exceptions=True)
    client, server = results
    if isinstance(client, BaseException):
        if not isinstance(server, BaseException):
            server.abort()
        raise client
    assert not isinstance(server, BaseException), server
    return client, server, expected


async def test_mutual_tls_alpn_and_identities(mesh: Mesh) -> None:
    client, server, expected = await _pair(mesh)
    try:
        assert server.ssl_object.selected_alpn_protocol() == tls.ALPN_OPAQUE
        assert peer_identity(server.ssl_object) == SCHEME.identity("web", "ns")
        assert peer_identity(client.ssl_object) == expected
        assert server.ssl_object.version() == "TLSv1.3"
    finally:
        client.abort()
        server.abort()


async def test_wrong_server_identity_is_refused_before_any_byte(mesh: Mesh) -> None:
    loop = asyncio.get_running_loop()
    _, _, client_ctx = mesh.contexts("web", (tls.ALPN_HTTP1,))
    _, server_ctx, _ = mesh.contexts("voting")
    expected = SCHEME.identity("emoji", "ns")
    outside, accepted = await tcp_pair()
    server_task = asyncio.create_task(tls.terminate(loop, accepted, server_ctx, b""))
    with pytest.raises(UpstreamIdentityMismatch, match=r"is not emoji\.ns") as raised:
        await handshake_errors(tls.originate(loop, outside, client_ctx, expected),
                               "127.0.0.1:1", expected)
    assert "Hostname mismatch" in raised.value.message
    with pytest.raises((ssl.SSLError, ConnectionError)):
        async with asyncio.timeout(IO_TIMEOUT):
            await server_task


async def test_half_close_both_ways_and_a_large_transfer(mesh: Mesh) -> None:
    client, server, _ = await _pair(mesh)
    sink = Recorder(keep_open_on_eof=True)
    source = Recorder()
    server.attach(sink)
    client.attach(source)
    payload = os.urandom(5 * 1024 * 1024)  # many records, past every write buffer mark
    client.transport.write(payload)
    client.transport.write_eof()  # close_notify + FIN: the server reads EOF ...
    async with asyncio.timeout(IO_TIMEOUT):
        await sink.eof
    assert hashlib.sha256(sink.data).digest() == hashlib.sha256(payload).digest()
    # ... and can still answer: the other direction is open (TLS 1.3 half-close).
    server.transport.write(b"answer after the client's EOF")
    server.transport.write_eof()
    async with asyncio.timeout(IO_TIMEOUT):
        await source.eof
        assert bytes(source.data) == b"answer after the client's EOF"
        # Both directions ended: both sides close cleanly (no error to the protocols).
        assert await sink.lost is None
        assert await source.lost is None


async def test_pause_reading_holds_records_until_resumed(mesh: Mesh) -> None:
    client, server, _ = await _pair(mesh)
    sink = Recorder()
    server.attach(sink)
    client.attach(Recorder())
    server.transport.pause_reading()
    client.transport.write(b"x" * 100_000)
    await asyncio.sleep(0.2)
    assert len(sink.data) == 0
    server.transport.resume_reading()
    async with asyncio.timeout(IO_TIMEOUT):
        while len(sink.data) < 100_000:
            await asyncio.sleep(0.01)
    assert bytes(sink.data) == b"x" * 100_000
    client.abort()
    server.abort()


async def test_truncation_without_close_notify_is_an_error(mesh: Mesh) -> None:
    client, server, _ = await _pair(mesh)
    sink = Recorder()
    server.attach(sink)
    client.attach(Recorder())
    client.transport.write(b"partial")
    await asyncio.sleep(0.05)
    assert client.raw is not None
    client.raw.write_eof()  # a FIN with no close_notify: somebody cut the stream
    async with asyncio.timeout(IO_TIMEOUT):
        error = await sink.lost
    assert not sink.eof.done()
    assert bytes(sink.data) == b"partial"
    assert error is not None or sink.lost.done()
    client.abort()


async def test_relay_between_plaintext_and_tls_with_half_close(mesh: Mesh) -> None:
    """app client -> [relay] -> TLS -> [relay] -> echo server, and back: the shape of a
    port-mapped opaque connection through two proxies."""
    loop = asyncio.get_running_loop()
    counters_out, counters_in = Counters(), Counters()
    async with tcp_server(echo) as echo_port:
        client, server, _ = await _pair(mesh)
        app_side, proxy_side = await tcp_pair()
        outbound = Relay(counters_out, client_initial=b"first ")
        client.attach(outbound.upstream)
        await loop.connect_accepted_socket(lambda: outbound.client, proxy_side)
        to_echo = socket.create_connection((LOOPBACK, echo_port))
        to_echo.setblocking(False)
        inbound = Relay(counters_in)
        server.attach(inbound.client)
        await loop.connect_accepted_socket(lambda: inbound.upstream, to_echo)
        payload = os.urandom(3 * 1024 * 1024)
        await loop.sock_sendall(app_side, payload)
        app_side.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(IO_TIMEOUT):
            received = await recv_all(app_side)
            await outbound.wait()
            await inbound.wait()
        app_side.close()
    assert received == b"first " + payload
    assert (outbound.error, inbound.error) == (False, False)
    assert counters_out.read_bytes == len(received) == counters_out.written_bytes
    assert counters_out.closes == [False] and counters_in.closes == [False]
