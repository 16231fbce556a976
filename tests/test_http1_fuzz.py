"""Property: whatever bytes a client sends, the HTTP/1 front end answers with HTTP
responses or closes the connection cleanly; it never raises, never hangs, and keeps
serving the next client.

The proxy (the engine's ServerProtocol on uvloop, forwarding to an independent upstream,
the standard library's HTTP server) runs in a thread with its own loop; each example is a
real loopback connection: send the bytes, half-close, read to the end with a deadline.
Inputs are random bytes and valid requests mutated (bytes flipped, inserted, dropped,
lines duplicated, framing fields added or contradicted).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
from collections.abc import Iterator

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.proxy.config import Http1Settings
from shoal.proxy.http1.client import Pool
from shoal.proxy.http1.server import Connections, ServerContext, ServerProtocol
from shoal.proxy.route import FixedRouter, FixedTarget, NullRequestCounter, NullTcpCounter

from .apps import LOOPBACK, HttpApp

# An answer must start within this; the upstream answers in milliseconds, and the
# proxy's own timeouts (request head 10 s) are not what these inputs should hit.
ANSWER_TIMEOUT_SECONDS = 5.0

VALID = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /big?bytes=5000 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET http://a:80/x HTTP/1.1\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET /chunked?n=2 HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"PUT /echo HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
]
FRAMING_LINES = [
    b"Content-Length: 3\r\n", b"Content-Length: 99999\r\n", b"Content-Length: -1\r\n",
    b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: gzip\r\n", b"Host: other\r\n",
    b"Connection: close, x-a\r\n", b"Expect: 100-continue\r\n", b"X-A: \x00\r\n",
    b"Upgrade: h2c\r\n", b": empty-name\r\n", b"\r\n", b"0\r\n\r\n",
]


class ProxyThread:
    """The front end on its own uvloop in a thread, recording anything that goes wrong
    (a loop exception, an error logged by the proxy)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.loop = uvloop.new_event_loop()
        self.problems: list[str] = []
        self.port = 0
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.connections = Connections()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.set_exception_handler(
            lambda loop, context: self.problems.append(str(context)))
        pool = Pool(max_idle=4, idle_timeout=3.0, max_head_bytes=64 * 1024)
        target = FixedTarget(LOOPBACK, self.upstream_port, pool, NullRequestCounter(), 1.0)
        ctx = ServerContext(FixedRouter(target), Http1Settings(), NullTcpCounter(),
                            self.connections)
        server = self.loop.run_until_complete(
            self.loop.create_server(lambda: ServerProtocol(ctx), LOOPBACK, 0))
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.ready.set()
        self.loop.run_forever()
        server.close()
        self.connections.close_all()
        pool.close_all()

    def start(self) -> ProxyThread:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


@pytest.fixture(scope="module")
def front() -> Iterator[ProxyThread]:
    app = HttpApp("fuzz").start()
    proxy = ProxyThread(app.port).start()
    yield proxy
    proxy.stop()
    app.stop()


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection((LOOPBACK, port), timeout=ANSWER_TIMEOUT_SECONDS) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy may answer and close before reading everything
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break  # closed with unread input still queued: a close, not a hang
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.integers(0, 4))
        position = draw(st.integers(0, len(data)))
        if kind == 0 and data:
            data[min(position, len(data) - 1)] = draw(st.integers(0, 255))
        elif kind == 1:
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif kind == 2:
            del data[position:position + draw(st.integers(1, 16))]
        elif kind == 3:
            line_end = data.find(b"\r\n")
            if line_end > 0:
                data[line_end + 2:line_end + 2] = draw(st.sampled_from(FRAMING_LINES))
        else:
            data += draw(st.sampled_from(VALID))
    return bytes(data)


RESPONSE_START = re.compile(rb"HTTP/1\.1 [1-5]\d\d ")


def _check(front: ProxyThread, data: bytes) -> None:
    recorder = _Recorder()
    logging.getLogger("shoal").addHandler(recorder)
    try:
        answer = _exchange(front.port, data)
    finally:
        logging.getLogger("shoal").removeHandler(recorder)
    # A response, or a clean close without a byte; never a traceback, never a hang
    # (a hang is the socket timeout raising above).
    assert answer == b"" or RESPONSE_START.match(answer), answer[:200]
    assert not front.problems, front.problems
    assert not recorder.records, recorder.records


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated())
def test_mutated_requests_get_an_answer_or_a_clean_close(front: ProxyThread,
                                                         data: bytes) -> None:
    _check(front, data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(min_size=0, max_size=2048))
def test_random_bytes_get_an_answer_or_a_clean_close(front: ProxyThread, data: bytes) -> None:
    _check(front, data)


def test_front_end_still_serves_after_the_fuzzing(front: ProxyThread) -> None:
    answer = _exchange(front.port, VALID[0])
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"hello from fuzz\n")
    assert not front.connections.live or all(c.closing for c in front.connections.live)
