"""Classifying accepted connections (shoal.proxy.accept.classify) with real loopback
sockets: client-first protocols, server-speaks-first protocols without a stall, opaque
ports, silent peers, connect failures and broken clients; and a real NATS client through a
forwarder built from classify + forward_opaque."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import uvloop

from shoal.kernel.bus import connect
from shoal.kernel.config import BusSettings
from shoal.proxy.accept import Classified, ClientReset, Connector, classify, connect_tcp
from shoal.proxy.detect import DETECT_TIMEOUT_SECONDS, HTTP2_PREFACE

from .conftest import Bus
from .netutil import (
    LOOPBACK,
    banner,
    echo,
    forwarder,
    listener,
    port_of,
    recv_all,
    recv_exactly,
    reset,
    send_all,
    silent,
    tcp_pair,
    tcp_server,
)

# Far above anything these tests wait for: if detection stalled, they would fail, not hang.
LONG = DETECT_TIMEOUT_SECONDS
# "At once", generously: the stall this prevents is Linkerd's 10 s.
PROMPT = 1.0


def connector_to(port: int) -> Connector:
    async def connect_upstream() -> socket.socket:
        return await connect_tcp(asyncio.get_running_loop(), LOOPBACK, port, 1.0)

    return connect_upstream


def signalling_connector(port: int) -> tuple[Connector, asyncio.Event]:
    """A connector and an event set once it has connected (to act after the connect)."""
    connected = asyncio.Event()

    async def connect_upstream() -> socket.socket:
        upstream = await connect_tcp(asyncio.get_running_loop(), LOOPBACK, port, 1.0)
        connected.set()
        return upstream

    return connect_upstream, connected


async def classify_timed(client: socket.socket, port: int | None, *, timeout: float = LONG,
                         opaque: bool = False) -> tuple[Classified, float]:
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    found = await classify(loop, client, opaque=opaque,
                           connect_upstream=connector_to(port) if port else None,
                           timeout=timeout)
    return found, time.monotonic() - started


@pytest.mark.parametrize(("first_bytes", "protocol"), [
    (b"GET / HTTP/1.1\r\nHost: web\r\n\r\n", "http1"),
    (HTTP2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", "http2"),
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", "opaque"),  # a TLS ClientHello
])
async def test_client_speaks_first(first_bytes: bytes, protocol: str) -> None:
    async with tcp_server(silent) as port:
        outside, accepted = await tcp_pair()
        with outside, accepted:
            await send_all(outside, first_bytes)
            found, elapsed = await classify_timed(accepted, port)
            assert found.protocol == protocol
            assert found.reason == "detected"
            assert found.client_data == first_bytes
            assert found.upstream_data == b""
            assert elapsed < PROMPT
            # The eager upstream connection is handed over (opaque needs it; the HTTP side
            # may use it or close it).
            if protocol == "opaque":
                assert found.upstream is not None
            if found.upstream is not None:
                assert found.upstream.getpeername()[1] == port
                found.upstream.close()


async def test_request_in_pieces_is_read_until_decided() -> None:
    outside, accepted = await tcp_pair()
    with outside, accepted:
        async def trickle() -> None:
            for piece in (b"GE", b"T /lo", b"ng HTTP/1", b".1\r\nHost: x\r\n\r\n"):
                await send_all(outside, piece)
                await asyncio.sleep(0.02)

        sender = asyncio.create_task(trickle())
        found, _ = await classify_timed(accepted, None)
        await sender
    assert found.protocol == "http1"
    assert found.client_data.startswith(b"GET /long HTTP/1.1\r\n")
    assert found.upstream is None


@pytest.mark.parametrize("greeting", [
    b"INFO {\"server_id\":\"x\",\"version\":\"2.10.0\"}\r\n",  # NATS
    b"220 mail.example ESMTP ready\r\n",  # SMTP
    b"J\x00\x00\x00\x0a8.0.36\x00",  # MySQL handshake
])
async def test_server_speaks_first_without_a_stall(greeting: bytes) -> None:
    """A silent client and a server that greets: opaque at once, greeting handed back."""
    async with tcp_server(banner(greeting)) as port:
        outside, accepted = await tcp_pair()
        with outside, accepted:
            found, elapsed = await classify_timed(accepted, port)
            assert found.protocol == "opaque"
            assert found.reason == "server-first"
            assert found.upstream_data == greeting
            assert found.client_data == b""
            assert found.upstream is not None
            found.upstream.close()
    assert elapsed < PROMPT


async def test_server_greeting_wins_over_a_later_http_looking_client() -> None:
    """If the server has spoken by the time the client's request line is decided, the
    connection is opaque: an HTTP server never speaks first."""
    greeting = b"220 ready\r\n"
    async with tcp_server(banner(greeting)) as port:
        outside, accepted = await tcp_pair()
        with outside, accepted:
            async def late_request() -> None:
                await asyncio.sleep(0.2)  # the greeting is there long before
                await send_all(outside, b"GET / HTTP/1.1\r\n\r\n")

            sender = asyncio.create_task(late_request())
            found, _ = await classify_timed(accepted, port)
            await sender
            assert found.protocol == "opaque"
            assert found.reason == "server-first"
            assert found.upstream_data == greeting
            assert found.upstream is not None
            found.upstream.close()


# An h2c server's preface: SETTINGS (12 bytes: two settings) and a WINDOW_UPDATE.
H2_SERVER_GREETING = (b"\x00\x00\x0c\x04\x00\x00\x00\x00\x00" + b"\x00\x03\x00\x00\x00\x64"
                      + b"\x00\x04\x00\x01\x00\x00"
                      + b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x0f\x00\x01")


@pytest.mark.parametrize(("first", "protocol", "reason"), [
    (HTTP2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", "http2", "detected"),
    (b"GET / HTTP/1.1\r\n\r\n", "opaque", "server-first"),
])
async def test_an_h2c_server_greeting_first_lets_the_client_decide(
        first: bytes, protocol: str, reason: str) -> None:
    """grpcio sends its SETTINGS as soon as it accepts: HTTP/2 from the client is still
    HTTP/2 (the greeting handed over for the engine); an HTTP/1 client gets it relayed."""
    async with tcp_server(banner(H2_SERVER_GREETING)) as port:
        outside, accepted = await tcp_pair()
        with outside, accepted:
            async def late_client() -> None:
                await asyncio.sleep(0.2)  # the greeting is there long before
                await send_all(outside, first)

            sender = asyncio.create_task(late_client())
            found, _ = await classify_timed(accepted, port)
            await sender
            assert (found.protocol, found.reason) == (protocol, reason)
            assert found.upstream_data == H2_SERVER_GREETING
            assert found.client_data == first
            assert found.upstream is not None
            found.upstream.close()


async def test_silent_client_and_silent_server_fall_back_to_opaque() -> None:
    async with tcp_server(silent) as port:
        outside, accepted = await tcp_pair()
        with outside, accepted:
            found, elapsed = await classify_timed(accepted, port, timeout=0.3)
            assert found.protocol == "opaque"
            assert found.reason == "timeout"
            assert found.upstream is not None
            found.upstream.close()
    assert 0.29 <= elapsed < 0.3 + PROMPT


async def test_silent_client_without_connector_times_out() -> None:
    """Without a connector (Linkerd's situation) a server-first protocol could only be
    seen after the timeout: classify then says opaque with no upstream."""
    outside, accepted = await tcp_pair()
    with outside, accepted:
        found, elapsed = await classify_timed(accepted, None, timeout=0.2)
    assert (found.protocol, found.reason, found.upstream) == ("opaque", "timeout", None)
    assert elapsed >= 0.19


async def test_opaque_port_skips_detection() -> None:
    async with tcp_server(silent) as port:
        outside, accepted = await tcp_pair()
        with outside, accepted:
            await send_all(outside, b"GET / HTTP/1.1\r\n\r\n")
            found, elapsed = await classify_timed(accepted, port, opaque=True)
            assert (found.protocol, found.reason, found.client_data) == (
                "opaque", "opaque-port", b"")
            assert found.upstream is not None
            found.upstream.close()
            # The client's bytes were not consumed: they are forwarded as they are.
            assert accepted.recv(100) == b"GET / HTTP/1.1\r\n\r\n"
    assert elapsed < PROMPT


async def test_refused_upstream_is_reported_and_detection_goes_on() -> None:
    with listener() as closed:
        dead_port = port_of(closed)
    outside, accepted = await tcp_pair()
    with outside, accepted:
        await send_all(outside, b"GET / HTTP/1.1\r\n\r\n")
        found, _ = await classify_timed(accepted, dead_port)
        assert found.protocol == "http1"
        assert found.upstream is None
        # The connect may or may not have failed yet when the request line was decided.
        if found.upstream_error is not None:
            assert isinstance(found.upstream_error, ConnectionRefusedError)

        outside2, accepted2 = await tcp_pair()
        with outside2, accepted2:
            await send_all(outside2, b"\x16\x03\x01")
            found, _ = await classify_timed(accepted2, dead_port)
            assert found.protocol == "opaque" and found.upstream is None
            assert isinstance(found.upstream_error, ConnectionRefusedError)


async def test_client_eof_before_a_decision_is_opaque() -> None:
    async with tcp_server(echo) as port:
        outside, accepted = await tcp_pair()
        with outside, accepted:
            await send_all(outside, b"GE")
            outside.shutdown(socket.SHUT_WR)
            found, elapsed = await classify_timed(accepted, port)
            assert (found.protocol, found.reason, found.client_data) == (
                "opaque", "client-eof", b"GE")
            assert found.upstream is not None
            found.upstream.close()
    assert elapsed < PROMPT


async def test_client_reset_raises_and_closes_the_upstream() -> None:
    server_saw: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def record(sock: socket.socket) -> None:
        server_saw.set_result(await recv_all(sock))

    loop = asyncio.get_running_loop()
    async with tcp_server(record) as port:
        connect_upstream, connected = signalling_connector(port)
        outside, accepted = await tcp_pair()
        with accepted:
            task = loop.create_task(classify(loop, accepted, opaque=False,
                                             connect_upstream=connect_upstream, timeout=LONG))
            await send_all(outside, b"GE")
            async with asyncio.timeout(5):
                await connected.wait()
            reset(outside)
            with pytest.raises(ClientReset):
                await task
            async with asyncio.timeout(5):
                assert await server_saw == b""  # the eager upstream was closed, not leaked


async def test_cancelled_classify_leaks_nothing() -> None:
    server_saw: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def record(sock: socket.socket) -> None:
        server_saw.set_result(await recv_all(sock))

    loop = asyncio.get_running_loop()
    async with tcp_server(record) as port:
        connect_upstream, connected = signalling_connector(port)
        outside, accepted = await tcp_pair()
        with outside, accepted:
            task = loop.create_task(classify(loop, accepted, opaque=False,
                                             connect_upstream=connect_upstream, timeout=LONG))
            async with asyncio.timeout(5):
                await connected.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            async with asyncio.timeout(5):
                assert await server_saw == b""
            # The client socket is still usable by its owner (no reader left behind).
            await send_all(outside, b"still here")
            assert await recv_exactly(accepted, 10) == b"still here"


async def test_forwarder_relays_server_first_protocol() -> None:
    """classify + forward_opaque end to end: the greeting, then an echo with half-close."""
    async with tcp_server(banner(b"HELLO\r\n")) as port, forwarder(port, timeout=LONG) as front:
        loop = asyncio.get_running_loop()
        client = await connect_tcp(loop, LOOPBACK, front, 1.0)
        with client:
            assert await recv_exactly(client, 7) == b"HELLO\r\n"
            await send_all(client, b"ping")
            client.shutdown(socket.SHUT_WR)
            assert await recv_all(client) == b"ping"


async def test_nats_client_through_forwarder_without_stall(bus: Bus) -> None:
    """A real NATS client (nats-py) connects through classify + forward_opaque with the
    detection timeout at Linkerd's 10 s, and publishes and subscribes; it must connect in
    well under a second (a stall would take the full detection timeout)."""
    upstream_port = int(bus.url.rsplit(":", 1)[1])
    results: list[Classified] = []
    async with forwarder(upstream_port, timeout=DETECT_TIMEOUT_SECONDS,
                         results=results) as front:
        operator = bus.settings("operator")
        via_proxy = BusSettings(url=f"nats://{LOOPBACK}:{front}", user=operator.user,
                                password=operator.password, role="operator")
        started = time.monotonic()
        nc = await connect(via_proxy, "test-through-proxy", allow_reconnect=False)
        connected_in = time.monotonic() - started
        try:
            received: asyncio.Queue[bytes] = asyncio.Queue(maxsize=10)

            async def on_message(msg) -> None:
                received.put_nowait(msg.data)

            await nc.subscribe("test.proxy-edge.echo", cb=on_message)
            await nc.flush(timeout=2)
            for i in range(5):
                await nc.publish("test.proxy-edge.echo", f"message {i}".encode())
            got = [await asyncio.wait_for(received.get(), 5) for _ in range(5)]
            assert got == [f"message {i}".encode() for i in range(5)]
        finally:
            await nc.close()
    assert connected_in < PROMPT, f"NATS connect took {connected_in:.2f} s (a stall?)"
    assert results and results[0].protocol == "opaque"
    assert results[0].reason == "server-first"
    assert results[0].upstream_data.startswith(b"INFO ")
    print(f"NATS connect through the forwarder: {connected_in * 1000:.1f} ms")


def test_on_uvloop() -> None:
    """The proxy runs on uvloop: classify's readiness handling works there too."""

    async def scenario() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        await test_client_speaks_first(b"GET / HTTP/1.1\r\n\r\n", "http1")
        await test_server_speaks_first_without_a_stall(b"220 ready\r\n")
        await test_silent_client_and_silent_server_fall_back_to_opaque()
        await test_client_eof_before_a_decision_is_opaque()
        await test_cancelled_classify_leaks_nothing()
        await test_forwarder_relays_server_first_protocol()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


async def test_http2_server_settings_first_wait_for_the_client() -> None:
    """A gRPC server sends its SETTINGS at once: not a server-first protocol. Detection
    waits for the client, and hands the server's bytes back with the HTTP/2 verdict."""
    settings = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64"

    async def h2_server(sock: socket.socket) -> None:
        await asyncio.get_running_loop().sock_sendall(sock, settings)
        await recv_all(sock)

    loop = asyncio.get_running_loop()
    async with tcp_server(h2_server) as port:
        outside, accepted = await tcp_pair()
        with outside, accepted:
            async def connector() -> socket.socket:
                return await connect_tcp(loop, LOOPBACK, port, 1.0)

            task = asyncio.create_task(classify(loop, accepted, opaque=False,
                                                connect_upstream=connector, timeout=5.0))
            await asyncio.sleep(0.2)  # the server's SETTINGS arrive first
            assert not task.done()
            await send_all(outside, HTTP2_PREFACE)
            result = await task
            assert result.protocol == "http2" and result.upstream_data == settings
            assert result.upstream is not None
            result.upstream.close()
