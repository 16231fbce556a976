"""Opaque TCP forwarding (shoal.proxy.opaque.forward_opaque) between real loopback sockets:
half-close both ways, large transfers intact, ordering of bytes read before forwarding,
resets, idle timeout, cancellation, the splice fallback, and the same on uvloop."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable

import pytest
import uvloop

import shoal.proxy.opaque as opaque_module
from shoal.proxy.accept import connect_tcp
from shoal.proxy.opaque import SPLICE_AVAILABLE, forward_opaque

from .netutil import (
    LOOPBACK,
    Counters,
    echo,
    hash_stream,
    recv_all,
    recv_exactly,
    reset,
    send_all,
    tcp_pair,
    tcp_server,
)

MODES = [pytest.param(True, id="splice"), pytest.param(False, id="copy")]


async def start_forward(
    upstream_port: int, counters: Counters | None, *, splice: bool, initial: bytes = b"",
    upstream_initial: bytes = b"", idle_timeout: float = 60.0,
) -> tuple[socket.socket, asyncio.Task[None]]:
    """A client socket whose bytes go through forward_opaque to the server on
    ``upstream_port``; and the forwarding task."""
    loop = asyncio.get_running_loop()
    outside, accepted = await tcp_pair()
    upstream = await connect_tcp(loop, LOOPBACK, upstream_port, 5.0)
    task = loop.create_task(forward_opaque(
        accepted, upstream, initial, counters, upstream_initial=upstream_initial,
        splice=splice, idle_timeout=idle_timeout))
    return outside, task


async def finished(task: asyncio.Task[None]) -> None:
    async with asyncio.timeout(10):
        await task


@pytest.mark.parametrize("splice", MODES)
async def test_echo_with_half_close(splice: bool) -> None:
    """The client sends, shuts down its write side, and still reads every echoed byte."""
    payload = os.urandom(1_000_000)
    counters = Counters()
    async with tcp_server(echo) as port:
        client, task = await start_forward(port, counters, splice=splice)
        with client:
            await send_all(client, payload)
            client.shutdown(socket.SHUT_WR)
            assert await recv_all(client) == payload
        await finished(task)
    assert counters.read_bytes == len(payload)
    assert counters.written_bytes == len(payload)
    assert counters.closes == [False]


@pytest.mark.parametrize("splice", MODES)
async def test_server_half_close_keeps_client_direction_open(splice: bool) -> None:
    """The server answers and shuts down its write side first; the client sees EOF, then
    keeps sending, and the server still receives all of it."""
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def answer_first(sock: socket.socket) -> None:
        await send_all(sock, b"hello, then EOF")
        sock.shutdown(socket.SHUT_WR)
        received.set_result(await recv_all(sock))

    late = os.urandom(300_000)
    async with tcp_server(answer_first) as port:
        client, task = await start_forward(port, Counters(), splice=splice)
        with client:
            assert await recv_all(client) == b"hello, then EOF"
            await send_all(client, late)
            client.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(10):
                assert await received == late
        await finished(task)


@pytest.mark.parametrize(("splice", "size"), [
    pytest.param(True, 50_000_000, id="splice-50MB"),
    pytest.param(False, 20_000_000, id="copy-20MB"),
])
async def test_large_transfer_intact(splice: bool, size: int) -> None:
    """A large stream through echo comes back with the same sha256 (send and receive run
    at once, so the proxy's backpressure is exercised in both directions)."""
    block = os.urandom(1 << 20)
    payload_hash = hashlib.sha256()
    counters = Counters()

    async def sender(sock: socket.socket) -> None:
        sent = 0
        while sent < size:
            chunk = block[: size - sent]
            payload_hash.update(chunk)
            await send_all(sock, chunk)
            sent += len(chunk)
        sock.shutdown(socket.SHUT_WR)

    async with tcp_server(echo) as port:
        client, task = await start_forward(port, counters, splice=splice)
        with client:
            started = time.monotonic()
            async with asyncio.timeout(60):
                _, echoed = await asyncio.gather(sender(client), hash_stream(client, size))
            elapsed = time.monotonic() - started
        await finished(task)
    assert echoed == payload_hash.hexdigest()
    assert counters.read_bytes == size and counters.written_bytes == size
    print(f"{size / 1e6:.0f} MB echoed ({'splice' if splice else 'copy'}) in {elapsed:.2f} s")


@pytest.mark.parametrize("splice", MODES)
async def test_bytes_read_before_forwarding_go_first(splice: bool) -> None:
    """``initial`` reaches the server before anything the client sends later, and
    ``upstream_initial`` reaches the client before anything the server sends later."""
    async def recorder(sock: socket.socket) -> None:
        got = await recv_exactly(sock, 10)
        await send_all(sock, b"[" + got + b"]")
        sock.shutdown(socket.SHUT_WR)
        await recv_all(sock)

    counters = Counters()
    async with tcp_server(recorder) as port:
        client, task = await start_forward(port, counters, splice=splice, initial=b"01234",
                                           upstream_initial=b"BANNER ")
        with client:
            await send_all(client, b"56789")
            assert await recv_all(client) == b"BANNER [0123456789]"
        await finished(task)
    assert counters.read_bytes == 10  # initial counts as read from the client
    assert counters.written_bytes == len(b"BANNER [0123456789]")


@pytest.mark.parametrize("splice", MODES)
async def test_upstream_reset_is_passed_on(splice: bool) -> None:
    async def reset_after_hello(sock: socket.socket) -> None:
        await recv_exactly(sock, 5)
        reset(sock)

    counters = Counters()
    async with tcp_server(reset_after_hello) as port:
        client, task = await start_forward(port, counters, splice=splice)
        with client:
            await send_all(client, b"hello")
            with pytest.raises(ConnectionResetError):
                await recv_all(client)
        await finished(task)
    assert counters.closes == [True]


@pytest.mark.parametrize("splice", MODES)
async def test_idle_timeout_closes_both_sides(splice: bool) -> None:
    server_saw: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def wait_for_eof(sock: socket.socket) -> None:
        server_saw.set_result(await recv_all(sock))

    counters = Counters()
    async with tcp_server(wait_for_eof) as port:
        client, task = await start_forward(port, counters, splice=splice, idle_timeout=0.3)
        with client:
            await send_all(client, b"ping")
            started = time.monotonic()
            assert await recv_all(client) == b""  # closed by the proxy, not by the server
            waited = time.monotonic() - started
            async with asyncio.timeout(5):
                assert await server_saw == b"ping"
        await finished(task)
    assert 0.25 <= waited < 5
    assert counters.closes == [True]


async def test_cancel_closes_both_sockets() -> None:
    counters = Counters()
    async with tcp_server(echo) as port:
        client, task = await start_forward(port, counters, splice=True)
        with client:
            await send_all(client, b"x")
            assert await recv_exactly(client, 1) == b"x"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await recv_all(client) == b""
    assert counters.closes == [True]


async def test_client_reset_aborts_and_resets_upstream() -> None:
    server_error: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def read_until_error(sock: socket.socket) -> None:
        try:
            data = await recv_all(sock)
            server_error.set_result(f"eof after {len(data)}")
        except ConnectionResetError:
            server_error.set_result("reset")

    counters = Counters()
    async with tcp_server(read_until_error) as port:
        client, task = await start_forward(port, counters, splice=True)
        await send_all(client, b"abc")
        await asyncio.sleep(0.05)
        reset(client)
        await finished(task)
        async with asyncio.timeout(5):
            assert await server_error == "reset"
    assert counters.closes == [True]


@pytest.mark.skipif(not SPLICE_AVAILABLE, reason="splice is Linux only")
@pytest.mark.parametrize("refuse", ["all", "pipe-to-socket"])
async def test_falls_back_when_splice_is_refused(
    monkeypatch: pytest.MonkeyPatch, refuse: str
) -> None:
    """When the kernel answers EINVAL (as some sockets and sandboxes do), the direction
    copies instead, keeping bytes already in the pipe, and nothing is lost."""
    calls = {"refused": 0}
    real_splice = opaque_module._splice

    def refusing_splice(src: int, dst: int, count: int) -> int:
        from_pipe = stat.S_ISFIFO(os.fstat(src).st_mode)
        if refuse == "all" or from_pipe:
            calls["refused"] += 1
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_splice(src, dst, count)

    monkeypatch.setattr(opaque_module, "_splice", refusing_splice)
    payload = os.urandom(2_000_000)
    counters = Counters()
    async with tcp_server(echo) as port:
        client, task = await start_forward(port, counters, splice=True)
        with client:
            send = asyncio.create_task(send_all(client, payload))
            client_data = await recv_exactly(client, len(payload))
            await send
            client.shutdown(socket.SHUT_WR)
            assert await recv_all(client) == b""
        await finished(task)
    assert client_data == payload
    assert calls["refused"] == 2  # once per direction, then never asked again
    assert counters.closes == [False]


async def test_many_connections_do_not_mix() -> None:
    async with tcp_server(echo) as port:
        async def one(index: int) -> bytes:
            client, task = await start_forward(port, None, splice=index % 2 == 0)
            with client:
                await send_all(client, message(index))
                client.shutdown(socket.SHUT_WR)
                echoed = await recv_all(client)
            await finished(task)
            return echoed

        def message(index: int) -> bytes:
            return f"connection {index} ".encode() * 1000

        results = await asyncio.gather(*(one(i) for i in range(30)))
    assert results == [message(i) for i in range(30)]


def run_on_uvloop(scenario: Callable[[], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())  # type: ignore[arg-type]


@pytest.mark.parametrize("splice", MODES)
def test_on_uvloop(splice: bool) -> None:
    """The proxy runs on uvloop: the same echo, half-close and 20 MB hash there."""

    async def scenario() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        await test_echo_with_half_close(splice)
        await test_server_half_close_keeps_client_direction_open(splice)
        await test_large_transfer_intact(splice, 20_000_000)
        await test_upstream_reset_is_passed_on(splice)

    run_on_uvloop(scenario)


@pytest.mark.skipif(not SPLICE_AVAILABLE, reason="splice is Linux only")
async def test_splice_carries_the_bytes_on_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default on Linux the payload moves by splice, not through Python buffers."""
    spliced = {"bytes": 0}
    real_splice = opaque_module._splice

    def counting_splice(src: int, dst: int, count: int) -> int:
        moved = real_splice(src, dst, count)
        spliced["bytes"] += moved
        return moved

    monkeypatch.setattr(opaque_module, "_splice", counting_splice)
    payload = os.urandom(500_000)
    loop = asyncio.get_running_loop()
    async with tcp_server(echo) as port:
        outside, accepted = await tcp_pair()
        upstream = await connect_tcp(loop, LOOPBACK, port, 5.0)
        task = loop.create_task(forward_opaque(accepted, upstream, b"", None))
        with outside:
            await send_all(outside, payload)
            outside.shutdown(socket.SHUT_WR)
            assert await recv_all(outside) == payload
        await finished(task)
    # Each byte is spliced twice per direction (socket -> pipe -> socket), two directions.
    assert spliced["bytes"] == 4 * len(payload)
